"""Decode attention of short contexts in one launch: each program takes one (batch, kv head, row block) over all keys.

Three passes over the packed keys, all inside the program (the keys of a short context stay in L1/L2 after the first):
the coarse histogram of the rows' distances (9 bins of width d/8) and their smallest valid distance; the fine count of
the d/8 distances of each row's coarse bin, which gives the threshold t and the tie quota; then the selection, which
lists the keys kept by any row (dist < t, and the first `quota` ties in index order) with their codes or weights, and
the gather of their value rows. The thresholds need no reduction across programs: no split-K, no atomics, and the only
scratch is the program's list of kept keys.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_attend_kernel import _row_keep, _row_scalar, _store_row_weights
from .decode_gather import _gather_listed_rows, _new_sums
from .decode_split_k import (
    _PER_STEP,
    NIBBLE_TILES,
    _add_coarse,
    _add_fine,
    _batch_and_kv_head,
    _coarse_bin,
    _fine_fields,
    _hamming,
    _kept_count,
    _key_words,
    _place_fields,
    _program_rows,
    _query_word,
    _threshold_step,
)
from .triton_common import SINK_SCAN_N, _row_sink_ends, _scanned_sink_ends


@triton.jit
def _tile_distances(q0, q1, k0, k1, m_rows, offs_n, ok, stride_mn, W: tl.constexpr, HAS_MASK: tl.constexpr,
                    USE_POPC: tl.constexpr):  # fmt: skip
    """The Hamming distances of a tile of keys (words k0, k1) to the query words q0, q1 (one row's scalars, or (R, 1)
    for rows x keys), and which of them are valid: `ok` and not masked."""
    dist = _hamming(q0, q1, q0, q1, k0, k1, k0, k1, W, USE_POPC)
    if HAS_MASK:
        ok = ok & (tl.load(m_rows + offs_n * stride_mn, mask=ok, other=0) != 0)
    return dist, ok


@triton.jit
def _rows_histograms(q0, q1, k_base, m_rows, row_ok, low, n_keys, stride_kn, stride_kw, stride_mn,
                     D: tl.constexpr, W: tl.constexpr, R_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_MASK: tl.constexpr, USE_POPC: tl.constexpr, INVALID_CODE: tl.constexpr,
                     CHUNK_TILES: tl.constexpr, FINE_PASS: tl.constexpr):  # fmt: skip
    """One pass over all keys in (R, BLOCK_N) tiles, the next tile's key words loaded one iteration ahead. Coarse pass:
    the rows' (R, 16) coarse histograms (bins 0..8, zeros after) and their smallest valid distance (D + 1 if none).
    Fine pass (FINE_PASS): the (R, D / 8) histograms of the distances low .. low + D / 8 - 1 (each row's coarse bin).
    Packed counters per lane (`_add_coarse`, `_add_fine`), added into int32 totals every CHUNK_TILES tiles (at most
    127 for the coarse pass's 7-bit fields, NIBBLE_TILES for the fine pass's 4-bit ones)."""
    if FINE_PASS:
        totals = tl.zeros((R_BLOCK, D // 8), dtype=tl.int32)
    else:
        totals = tl.zeros((R_BLOCK, 16), dtype=tl.int32)
    smallest = tl.full((R_BLOCK, BLOCK_N), D + 1, dtype=tl.int32)
    for chunk_start in range(0, n_keys, CHUNK_TILES * BLOCK_N):
        chunk_end = tl.minimum(chunk_start + CHUNK_TILES * BLOCK_N, n_keys)
        fine0 = tl.zeros((R_BLOCK, BLOCK_N), dtype=tl.int32)
        fine1 = fine0
        fine2 = fine0
        fine3 = fine0
        coarse = tl.zeros((R_BLOCK, BLOCK_N), dtype=tl.int64)
        offs_next = chunk_start + tl.arange(0, BLOCK_N)[None, :]
        n0, n1, _, _ = _key_words(k_base, offs_next, offs_next < n_keys, stride_kn, stride_kw, W)
        for block_start in range(chunk_start, chunk_end, BLOCK_N):
            offs_n = block_start + tl.arange(0, BLOCK_N)[None, :]
            k0, k1 = n0, n1
            offs_next = offs_n + BLOCK_N
            n0, n1, _, _ = _key_words(k_base, offs_next, offs_next < chunk_end, stride_kn, stride_kw, W)
            ok = row_ok[:, None] & (offs_n < n_keys)
            dist, valid = _tile_distances(q0, q1, k0, k1, m_rows, offs_n, ok, stride_mn, W, HAS_MASK, USE_POPC)
            if FINE_PASS:
                code = tl.where(valid, dist, INVALID_CODE)
                fine0, fine1, fine2, fine3 = _add_fine(fine0, fine1, fine2, fine3, code, low[:, None], D // 8)
            else:
                coarse = _add_coarse(coarse, dist, valid, D)
                smallest = tl.minimum(smallest, tl.where(valid, dist, D + 1))
        if FINE_PASS:
            totals += _fine_fields(fine0, fine1, fine2, fine3, R_BLOCK, D // 8)
        else:
            totals += _place_fields(tl.zeros((R_BLOCK, 16), dtype=tl.int32), coarse, 0, 9, 7)
    return totals, tl.min(smallest, axis=1)


@triton.jit
def _row_state(r: tl.constexpr, r_local, row_ok, q0, q1, mask_rows, thr, quota, shift, n_keys):
    """Row r of the program, as scalars: its query words, mask row offset, threshold, tie quota, softmax shift and
    the end of its keys (0 for an absent row: nothing loaded, nothing kept)."""
    return (
        _row_scalar(tl.sum(q0, axis=1), r_local, r),
        _row_scalar(tl.sum(q1, axis=1), r_local, r),
        _row_scalar(mask_rows, r_local, r),
        _row_scalar(thr, r_local, r),
        _row_scalar(quota, r_local, r),
        _row_scalar(shift, r_local, r),
        n_keys * _row_scalar(row_ok.to(tl.int32), r_local, r),
    )


@triton.jit
def _select_row(q0, q1, k0, k1, mask_row, offs_n, row_end, thr, quota, seen, rank_ties, sink_end, stride_mn,
                W: tl.constexpr, HAS_MASK: tl.constexpr, USE_POPC: tl.constexpr, INVALID_CODE: tl.constexpr,
                SINKS: tl.constexpr):  # fmt: skip
    """One row's codes of a (SELECT_N // 8, 8) tile of keys (each thread's 8 keys contiguous; INVALID_CODE where the
    key is masked or past the row's end), which of them it keeps, and its running tie count (`_row_keep`)."""
    dist, valid = _tile_distances(q0, q1, k0, k1, mask_row, offs_n, offs_n < row_end, stride_mn, W, HAS_MASK,
                                  USE_POPC)  # fmt: skip
    code = tl.where(valid, dist, INVALID_CODE)
    keep, seen = _row_keep(code, thr, quota, seen, rank_ties, offs_n, sink_end, SINKS, INVALID_CODE)
    return code, keep, seen


@triton.jit(do_not_specialize=_PER_STEP)
def _short_decode_kernel(
    q_ptr,
    k_ptr,
    mask_ptr,
    v_ptr,
    out_ptr,
    index_ptr,
    weight_ptr,
    list_code_ptr,
    keep_ptr,
    sink_ptr,
    n_keys,
    list_stride,
    top_n,
    top_n_ratio_bits,
    rows_per_group,
    query_len,
    group,
    num_kv_heads,
    alpha_log2,
    alpha_nonnegative,
    sink_keys,
    stride_qb,
    stride_qh,
    stride_qi,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kw,
    stride_mb,
    stride_mh,
    stride_mi,
    stride_mn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_oi,
    stride_od,
    D: tl.constexpr,
    W: tl.constexpr,
    WORD_BITS: tl.constexpr,
    DV: tl.constexpr,
    R_BLOCK: tl.constexpr,
    R_DOT: tl.constexpr,
    COUNT_N: tl.constexpr,
    CHUNK_TILES: tl.constexpr,
    SELECT_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_MASK: tl.constexpr,
    USE_POPC: tl.constexpr,
    INVALID_CODE: tl.constexpr,
    V_IS_FP32: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROW_FMA: tl.constexpr,
    WRITE_KEEP: tl.constexpr,
    GATHER_STAGES: tl.constexpr,
    RATIO: tl.constexpr,
    SINKS: tl.constexpr,
):
    b, hk = _batch_and_kv_head(num_kv_heads)
    r_local = tl.arange(0, R_BLOCK)
    row, row_ok, grow = _program_rows(rows_per_group, R_BLOCK)
    head = hk * group + row // query_len
    qi = row % query_len

    # the rows' query sign words, (R, 1) each (int64 words from d = 64 on; W <= 2)
    q_base = b * stride_qb + head * stride_qh + qi * stride_qi
    q0 = _query_word(q_ptr, q_base, row_ok, 0, stride_qd, WORD_BITS)
    q1 = q0
    if W > 1:
        q1 = _query_word(q_ptr, q_base, row_ok, 1, stride_qd, WORD_BITS)
    mask_rows = b * stride_mb + head * stride_mh + qi * stride_mi
    k_base = k_ptr + b * stride_kb + hk * stride_kh

    # passes 1 and 2: the threshold t of each row (the smallest h with count(dist <= h) >= N) and its tie quota
    # N - count(dist < t), as the distance and fine-count kernels find them over all splits
    coarse, smallest = _rows_histograms(q0, q1, k_base, mask_ptr + mask_rows[:, None], row_ok, 0, n_keys, stride_kn,
                                        stride_kw, stride_mn, D, W, R_BLOCK, COUNT_N, HAS_MASK, USE_POPC,
                                        INVALID_CODE, CHUNK_TILES, False)  # fmt: skip
    # N of each row from its count of valid keys (the histogram's total)
    num_kept = _kept_count(tl.sum(coarse, axis=1), top_n, top_n_ratio_bits, RATIO)
    coarse_bin, below = _coarse_bin(coarse, num_kept)
    low = coarse_bin * (D // 8)
    fine, _ = _rows_histograms(q0, q1, k_base, mask_ptr + mask_rows[:, None], row_ok, low, n_keys, stride_kn,
                               stride_kw, stride_mn, D, W, R_BLOCK, COUNT_N, HAS_MASK, USE_POPC, INVALID_CODE,
                               NIBBLE_TILES, True)  # fmt: skip
    step, quota, ties = _threshold_step(fine, num_kept - below, D // 8)
    thr = tl.where(row_ok, low + step, -1)
    # the largest kept logit alpha * (d - 2h): at the smallest distance, or at the threshold if alpha < 0
    shift = tl.where(alpha_nonnegative != 0, tl.minimum(smallest, D), thr)
    # the ties are ranked (a scan per tile) only where a row keeps some but not all of them
    rank_ties = tl.max(((quota > 0) & (quota < ties)).to(tl.int32), axis=0) > 0
    if SINKS == 3:
        sinks = _scanned_sink_ends(mask_ptr + mask_rows, row_ok, n_keys, stride_mn, sink_keys, 0, SINK_SCAN_N)
    else:
        sinks = _row_sink_ends(sink_ptr, grow, row_ok, sink_keys, SINKS)

    # pass 3: select. The keys kept by any row are listed with (one row) their codes or (several) the rows' weights,
    # so that the gather issues value loads that are all useful. Up to 4 rows: one (SELECT_N // 8, 8) tile per row,
    # each thread's 8 keys contiguous (the attend kernel's selection)
    program = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    list_index = index_ptr + program * list_stride
    list_weight = weight_ptr + program * list_stride * R_BLOCK
    list_code = list_code_ptr + program * list_stride
    keys8 = tl.arange(0, SELECT_N // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
    num_listed = tl.sum(tl.zeros((R_BLOCK,), dtype=tl.int32), axis=0)
    den0 = tl.zeros((SELECT_N // 8,), dtype=tl.float32)
    q0_0, q1_0, mrow0, thr0, quota0, shift0, end0 = _row_state(0, r_local, row_ok, q0, q1, mask_rows, thr, quota,
                                                               shift, n_keys)  # fmt: skip
    seen0 = num_listed
    sink0 = _row_scalar(sinks, r_local, 0)
    if R_BLOCK > 1:
        q0_1, q1_1, mrow1, thr1, quota1, shift1, end1 = _row_state(1, r_local, row_ok, q0, q1, mask_rows, thr, quota,
                                                                   shift, n_keys)  # fmt: skip
        seen1 = num_listed
        sink1 = _row_scalar(sinks, r_local, 1)
        den1 = den0
    if R_BLOCK > 2:
        q0_2, q1_2, mrow2, thr2, quota2, shift2, end2 = _row_state(2, r_local, row_ok, q0, q1, mask_rows, thr, quota,
                                                                   shift, n_keys)  # fmt: skip
        q0_3, q1_3, mrow3, thr3, quota3, shift3, end3 = _row_state(3, r_local, row_ok, q0, q1, mask_rows, thr, quota,
                                                                   shift, n_keys)  # fmt: skip
        seen2 = num_listed
        seen3 = num_listed
        sink2 = _row_scalar(sinks, r_local, 2)
        sink3 = _row_scalar(sinks, r_local, 3)
        den2 = den0
        den3 = den0
    grow0 = _row_scalar(grow, r_local, 0)
    n0, n1, _, _ = _key_words(k_base, keys8, keys8 < n_keys, stride_kn, stride_kw, W)
    for block_start in range(0, n_keys, SELECT_N):
        offs_n = block_start + keys8
        # the key words a tile ahead, shared by the rows
        k0, k1 = n0, n1
        n0, n1, _, _ = _key_words(k_base, offs_n + SELECT_N, offs_n + SELECT_N < n_keys, stride_kn, stride_kw, W)
        code0, keep0, seen0 = _select_row(q0_0, q1_0, k0, k1, mask_ptr + mrow0, offs_n, end0, thr0, quota0, seen0,
                                          rank_ties, sink0, stride_mn, W, HAS_MASK, USE_POPC,
                                          INVALID_CODE, SINKS)  # fmt: skip
        listed = keep0.to(tl.int32)
        if R_BLOCK > 1:
            code1, keep1, seen1 = _select_row(q0_1, q1_1, k0, k1, mask_ptr + mrow1, offs_n, end1, thr1, quota1, seen1,
                                              rank_ties, sink1, stride_mn, W, HAS_MASK, USE_POPC,
                                              INVALID_CODE, SINKS)  # fmt: skip
            listed = tl.maximum(listed, keep1.to(tl.int32))
        if R_BLOCK > 2:
            code2, keep2, seen2 = _select_row(q0_2, q1_2, k0, k1, mask_ptr + mrow2, offs_n, end2, thr2, quota2, seen2,
                                              rank_ties, sink2, stride_mn, W, HAS_MASK, USE_POPC,
                                              INVALID_CODE, SINKS)  # fmt: skip
            code3, keep3, seen3 = _select_row(q0_3, q1_3, k0, k1, mask_ptr + mrow3, offs_n, end3, thr3, quota3, seen3,
                                              rank_ties, sink3, stride_mn, W, HAS_MASK, USE_POPC,
                                              INVALID_CODE, SINKS)  # fmt: skip
            listed = tl.maximum(listed, tl.maximum(keep2.to(tl.int32), keep3.to(tl.int32)))
        thread_listed = tl.sum(listed, axis=1)
        slot = num_listed + (tl.cumsum(thread_listed, axis=0) - thread_listed)[:, None] + tl.cumsum(listed, 1) - 1
        listed_here = listed > 0
        tl.store(list_index + slot, offs_n, mask=listed_here)
        num_listed += tl.sum(thread_listed, axis=0)
        if ROW_FMA:
            # one row: the gather computes the weights from the listed codes
            tl.store(list_code + slot, code0.to(list_code.dtype.element_ty), mask=listed_here)
        else:
            weight_at = list_weight + slot * R_BLOCK
            v_dtype = v_ptr.dtype.element_ty
            den0 = _store_row_weights(den0, keep0, shift0, code0, alpha_log2, weight_at, listed_here, v_dtype,
                                      V_IS_FP32)  # fmt: skip
            if R_BLOCK > 1:
                den1 = _store_row_weights(den1, keep1, shift1, code1, alpha_log2, weight_at + 1, listed_here, v_dtype,
                                          V_IS_FP32)  # fmt: skip
            if R_BLOCK > 2:
                den2 = _store_row_weights(den2, keep2, shift2, code2, alpha_log2, weight_at + 2, listed_here, v_dtype,
                                          V_IS_FP32)  # fmt: skip
                den3 = _store_row_weights(den3, keep3, shift3, code3, alpha_log2, weight_at + 3, listed_here, v_dtype,
                                          V_IS_FP32)  # fmt: skip
        if WRITE_KEEP:
            tl.store(keep_ptr + grow0 * n_keys + offs_n, keep0.to(tl.int8), mask=offs_n < end0)
            if R_BLOCK > 1:
                grow1 = _row_scalar(grow, r_local, 1)
                tl.store(keep_ptr + grow1 * n_keys + offs_n, keep1.to(tl.int8), mask=offs_n < end1)
            if R_BLOCK > 2:
                grow2 = _row_scalar(grow, r_local, 2)
                grow3 = _row_scalar(grow, r_local, 3)
                tl.store(keep_ptr + grow2 * n_keys + offs_n, keep2.to(tl.int8), mask=offs_n < end2)
                tl.store(keep_ptr + grow3 * n_keys + offs_n, keep3.to(tl.int8), mask=offs_n < end3)

    # the list was written by all threads of this program: make it visible to all of them
    tl.debug_barrier()

    # the gather: the listed value rows, weighted and summed (multiply-adds for one row, tl.dot for several)
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    partial, row_denominator = _new_sums(DV, R_DOT, BLOCK_K, ROW_FMA)
    partial, row_denominator = _gather_listed_rows(partial, row_denominator, v_base, list_index, list_weight, 0,
                                                   num_listed, list_code, shift0, alpha_log2, stride_vn, stride_vd,
                                                   DV, R_BLOCK, R_DOT, BLOCK_K, INVALID_CODE, V_IS_FP32, DOT_FP32,
                                                   ROW_FMA, GATHER_STAGES, True)  # fmt: skip
    offs_d = tl.arange(0, DV)
    if ROW_FMA:
        numerator = tl.sum(partial, axis=0)[None, :]
        total = tl.zeros((R_BLOCK,), dtype=tl.float32) + tl.sum(row_denominator, axis=0)
        out_row = row
        out_ok = row_ok
    else:
        # the (R_DOT, DV) sums of tl.dot: rows past R_BLOCK are padding
        out_local = tl.arange(0, R_DOT)
        numerator = partial
        total = tl.where(out_local == 0, tl.sum(den0, axis=0), 0.0)
        if R_BLOCK > 1:
            total += tl.where(out_local == 1, tl.sum(den1, axis=0), 0.0)
        if R_BLOCK > 2:
            total += tl.where(out_local == 2, tl.sum(den2, axis=0), 0.0)
            total += tl.where(out_local == 3, tl.sum(den3, axis=0), 0.0)
        out_row = tl.program_id(1) * R_BLOCK + out_local
        out_ok = (out_local < R_BLOCK) & (out_row < rows_per_group)
    # a row with no valid key has a zero denominator: zeros, never NaN
    out = tl.where(total[:, None] > 0, numerator / tl.maximum(total, 1e-30)[:, None], 0.0)
    out_head = hk * group + out_row // query_len
    out_rows = out_ptr + b * stride_ob + out_head * stride_oh + (out_row % query_len) * stride_oi
    tl.store(out_rows[:, None] + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=out_ok[:, None])
