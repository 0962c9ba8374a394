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
def _gather_listed_rows(
    v_base,
    list_index,
    list_weight,
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
):
    """The weighted sum of the listed value rows: (R_DOT, DV) for `tl.dot` ((BLOCK_K, DV) per-slot sums for ROW_FMA,
    reduced by the caller), and (ROW_FMA) the row's (BLOCK_K,) per-slot denominators.

    `row_codes` and `row_shift` are the one row's codes and softmax shift (ROW_FMA only). GATHER_STAGES 0: the loads
    of the next tile are issued by hand one iteration ahead (the list entries two ahead); > 0: a plain loop that
    Triton's pipeliner runs with that many stages (on the GPU: asynchronous copies, several tiles in flight).
    """
    offs_d = tl.arange(0, DV)
    slots = tl.arange(0, BLOCK_K)
    # tl.dot needs >= 16 rows: the weight rows past R_BLOCK are zeros (R_DOT is 1 on the multiply-add path)
    weight_rows = tl.arange(0, R_DOT)
    weight_row_ok = (weight_rows < R_BLOCK)[:, None]
    row_denominator = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if ROW_FMA:
        # multiply-add in registers (no tensor-core layout shuffles), reduced once after the loop
        partial = tl.zeros((BLOCK_K, DV), dtype=tl.float32)
    else:
        partial = tl.zeros((R_DOT, DV), dtype=tl.float32)
    if GATHER_STAGES > 0:
        for k0 in tl.range(0, num_listed, BLOCK_K, num_stages=GATHER_STAGES):
            tile = k0 + slots
            tile_ok = tile < num_listed
            index = tl.load(list_index + tile, mask=tile_ok, other=0)
            tile_v = _gather_rows(v_base, index, tile_ok, offs_d, stride_vn, stride_vd)
            if ROW_FMA:
                tile_codes = tl.load(row_codes + index, mask=tile_ok, other=INVALID_CODE)
                tile_weights = tile_codes
            else:
                tile_weights = _listed_weights(list_weight, tile, num_listed, weight_rows, weight_row_ok, R_BLOCK)
                tile_codes = tile_weights
            partial, row_denominator = _add_tile(partial, row_denominator, tile_v, tile_weights, tile_codes,
                                                 row_shift, alpha_log2, INVALID_CODE, V_IS_FP32, DOT_FP32,
                                                 ROW_FMA)  # fmt: skip
    else:
        # software pipeline by hand: the list entries two tiles ahead, the value rows one tile ahead, so that the
        # loads of the next tile are in flight while the current one is accumulated
        index = tl.load(list_index + slots, mask=slots < num_listed, other=0)
        if ROW_FMA:
            # one row: the weights come from the listed keys' codes (one byte each, written by the distance kernel)
            codes = tl.load(row_codes + index, mask=slots < num_listed, other=INVALID_CODE)
            weights = codes
        else:
            weights = _listed_weights(list_weight, slots, num_listed, weight_rows, weight_row_ok, R_BLOCK)
            next_weights = _listed_weights(
                list_weight, BLOCK_K + slots, num_listed, weight_rows, weight_row_ok, R_BLOCK
            )
            codes = weights
        v = _gather_rows(v_base, index, slots < num_listed, offs_d, stride_vn, stride_vd)
        next_index = tl.load(list_index + BLOCK_K + slots, mask=BLOCK_K + slots < num_listed, other=0)
        for k0 in range(0, num_listed, BLOCK_K):
            tile_v = v
            following = k0 + BLOCK_K + slots
            v = _gather_rows(v_base, next_index, following < num_listed, offs_d, stride_vn, stride_vd)
            tile_codes = codes
            tile_weights = weights
            if ROW_FMA:
                codes = tl.load(row_codes + next_index, mask=following < num_listed, other=INVALID_CODE)
            else:
                weights = next_weights
            after = following + BLOCK_K
            next_index = tl.load(list_index + after, mask=after < num_listed, other=0)
            if not ROW_FMA:
                next_weights = _listed_weights(list_weight, after, num_listed, weight_rows, weight_row_ok, R_BLOCK)
            partial, row_denominator = _add_tile(partial, row_denominator, tile_v, tile_weights, tile_codes,
                                                 row_shift, alpha_log2, INVALID_CODE, V_IS_FP32, DOT_FP32,
                                                 ROW_FMA)  # fmt: skip
    return partial, row_denominator
