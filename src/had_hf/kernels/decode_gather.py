"""The gather phase of the decode attend kernel: load the value rows of a program's list of kept keys and accumulate
their weighted sum, in one of two loops (a software pipeline written by hand, or Triton's pipeliner)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _kept_weights(keep, shift, code, alpha_log2, V_DTYPE: tl.constexpr, V_IS_FP32: tl.constexpr):
    """exp(alpha * (Sb - Sb_max)) of kept keys (exponent <= 0), 0 elsewhere (no overflow for masked codes when
    alpha < 0); rounded to the value dtype, as the numerator multiplies it so, unless the values are fp32."""
    p = tl.exp2(tl.where(keep, (shift - code).to(tl.float32) * alpha_log2, float("-inf")))
    if not V_IS_FP32:
        p = p.to(V_DTYPE).to(tl.float32)
    return p


@triton.jit
def _listed_weights(list_weight, slot, num_listed, weight_rows, weight_row_ok, R_BLOCK: tl.constexpr):
    """(R_DOT, BLOCK_K) weights of the list entries at `slot` (zeros past the list and on padding rows)."""
    return tl.load(
        list_weight + slot[None, :] * R_BLOCK + weight_rows[:, None],
        mask=weight_row_ok & (slot < num_listed)[None, :],
        other=0.0,
    )


@triton.jit
def _gather_rows(v_base, index, ok, offs_d, stride_vn, stride_vd):
    """(BLOCK_K, DV) value rows at the listed key indices (zeros where not `ok`)."""
    return tl.load(
        v_base + index[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd, mask=ok[:, None], other=0.0
    )


@triton.jit
def _add_tile(partial, row_denominator, tile_v, tile_weights, tile_codes, row_shift, alpha_log2,
              INVALID_CODE: tl.constexpr, V_IS_FP32: tl.constexpr, DOT_FP32: tl.constexpr,
              ROW_FMA: tl.constexpr):  # fmt: skip
    """Adds one tile of gathered value rows to the running weighted sum: with `tl.dot` and the listed weights of the
    program's rows, or (ROW_FMA, one row) with multiply-adds and weights computed from the listed keys' codes."""
    if ROW_FMA:
        # INVALID_CODE marks slots past the list: weight 0
        p = _kept_weights(tile_codes != INVALID_CODE, row_shift, tile_codes.to(tl.int32), alpha_log2,
                          tile_v.dtype, V_IS_FP32)  # fmt: skip
        row_denominator += p
        partial += p[:, None] * tile_v.to(tl.float32)
    elif DOT_FP32:
        # fp32 values, or the interpreter, whose tl.dot mishandles 16-bit floats (the weights are rounded)
        partial += tl.dot(tile_weights, tile_v.to(tl.float32), input_precision="ieee")
    else:
        partial += tl.dot(tile_weights.to(tile_v.dtype), tile_v)
    return partial, row_denominator


@triton.jit
def _new_sums(DV: tl.constexpr, R_DOT: tl.constexpr, BLOCK_K: tl.constexpr, ROW_FMA: tl.constexpr):
    """The zero running sums of a program's gather: (R_DOT, DV) for `tl.dot` ((BLOCK_K, DV) per-slot sums for ROW_FMA,
    reduced once at the end: multiply-adds in registers, no tensor-core layout shuffles), and (ROW_FMA) the row's
    (BLOCK_K,) per-slot denominators."""
    row_denominator = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if ROW_FMA:
        partial = tl.zeros((BLOCK_K, DV), dtype=tl.float32)
    else:
        partial = tl.zeros((R_DOT, DV), dtype=tl.float32)
    return partial, row_denominator


@triton.jit
def _gather_listed_rows(
    partial,
    row_denominator,
    v_base,
    list_index,
    list_weight,
    first,
    last,
    row_codes,
    row_shift,
    alpha_log2,
    stride_vn,
    stride_vd,
    DV: tl.constexpr,
    R_BLOCK: tl.constexpr,
    R_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INVALID_CODE: tl.constexpr,
    V_IS_FP32: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROW_FMA: tl.constexpr,
    GATHER_STAGES: tl.constexpr,
    CODES_BY_SLOT: tl.constexpr,
):
    """Adds the value rows of list entries first .. last - 1 (first a multiple of BLOCK_K) to the running sums
    (`_new_sums`), a tile of BLOCK_K entries at a time.

    `row_codes` and `row_shift` are the one row's codes and softmax shift (ROW_FMA only): its codes by key index, or
    (CODES_BY_SLOT) the listed keys' codes by list entry. GATHER_STAGES 0: the loads
    of the next tile are issued by hand one iteration ahead (the list entries two ahead); > 0: a plain loop that
    Triton's pipeliner runs with that many stages (on the GPU: asynchronous copies, several tiles in flight).
    """
    offs_d = tl.arange(0, DV)
    slots = first + tl.arange(0, BLOCK_K)
    # tl.dot needs >= 16 rows: the weight rows past R_BLOCK are zeros (R_DOT is 1 on the multiply-add path)
    weight_rows = tl.arange(0, R_DOT)
    weight_row_ok = (weight_rows < R_BLOCK)[:, None]
    if GATHER_STAGES > 0:
        for k0 in tl.range(first, last, BLOCK_K, num_stages=GATHER_STAGES):
            tile = k0 - first + slots
            tile_ok = tile < last
            index = tl.load(list_index + tile, mask=tile_ok, other=0)
            tile_v = _gather_rows(v_base, index, tile_ok, offs_d, stride_vn, stride_vd)
            if ROW_FMA:
                tile_codes = tl.load(row_codes + (tile if CODES_BY_SLOT else index), mask=tile_ok, other=INVALID_CODE)
                tile_weights = tile_codes
            else:
                tile_weights = _listed_weights(list_weight, tile, last, weight_rows, weight_row_ok, R_BLOCK)
                tile_codes = tile_weights
            partial, row_denominator = _add_tile(partial, row_denominator, tile_v, tile_weights, tile_codes,
                                                 row_shift, alpha_log2, INVALID_CODE, V_IS_FP32, DOT_FP32,
                                                 ROW_FMA)  # fmt: skip
    else:
        # software pipeline by hand: the list entries two tiles ahead, the value rows one tile ahead, so that the
        # loads of the next tile are in flight while the current one is accumulated
        index = tl.load(list_index + slots, mask=slots < last, other=0)
        if ROW_FMA:
            # one row: the weights come from the listed keys' codes (one byte each)
            codes = tl.load(row_codes + (slots if CODES_BY_SLOT else index), mask=slots < last, other=INVALID_CODE)
            weights = codes
        else:
            weights = _listed_weights(list_weight, slots, last, weight_rows, weight_row_ok, R_BLOCK)
            next_weights = _listed_weights(list_weight, BLOCK_K + slots, last, weight_rows, weight_row_ok, R_BLOCK)
            codes = weights
        v = _gather_rows(v_base, index, slots < last, offs_d, stride_vn, stride_vd)
        next_index = tl.load(list_index + BLOCK_K + slots, mask=BLOCK_K + slots < last, other=0)
        for k0 in range(first, last, BLOCK_K):
            tile_v = v
            following = k0 - first + BLOCK_K + slots
            v = _gather_rows(v_base, next_index, following < last, offs_d, stride_vn, stride_vd)
            tile_codes = codes
            tile_weights = weights
            if ROW_FMA:
                codes = tl.load(
                    row_codes + (following if CODES_BY_SLOT else next_index), mask=following < last, other=INVALID_CODE
                )
            else:
                weights = next_weights
            after = following + BLOCK_K
            next_index = tl.load(list_index + after, mask=after < last, other=0)
            if not ROW_FMA:
                next_weights = _listed_weights(list_weight, after, last, weight_rows, weight_row_ok, R_BLOCK)
            partial, row_denominator = _add_tile(partial, row_denominator, tile_v, tile_weights, tile_codes,
                                                 row_shift, alpha_log2, INVALID_CODE, V_IS_FP32, DOT_FP32,
                                                 ROW_FMA)  # fmt: skip
    return partial, row_denominator


@triton.jit
def _gather_whole_tiles(
    partial,
    row_denominator,
    v_base,
    list_index,
    list_weight,
    gathered,
    num_listed,
    row_codes,
    row_shift,
    alpha_log2,
    stride_vn,
    stride_vd,
    DV: tl.constexpr,
    R_BLOCK: tl.constexpr,
    R_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INVALID_CODE: tl.constexpr,
    V_IS_FP32: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROW_FMA: tl.constexpr,
    GATHER_STAGES: tl.constexpr,
    CODES_BY_SLOT: tl.constexpr,
):
    """During the selection: adds the whole tiles of the list written so far past the `gathered` first entries, and
    returns the new count of gathered entries. The tiles are those that one gather after the selection would add, in
    the same order: the same sums."""
    # the entries just listed were written by all threads of this program: make them visible to all of them
    tl.debug_barrier()
    whole = num_listed - num_listed % BLOCK_K
    partial, row_denominator = _gather_listed_rows(partial, row_denominator, v_base, list_index, list_weight,
                                                   tl.multiple_of(gathered, BLOCK_K), whole, row_codes, row_shift,
                                                   alpha_log2, stride_vn, stride_vd, DV, R_BLOCK, R_DOT, BLOCK_K,
                                                   INVALID_CODE, V_IS_FP32, DOT_FP32, ROW_FMA,
                                                   GATHER_STAGES, CODES_BY_SLOT)  # fmt: skip
    return partial, row_denominator, whole
