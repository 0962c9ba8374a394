"""Decode kernel 3 of 3: select the kept keys of a split (below the threshold, plus the split's share of the ties),
gather their value rows and reduce the splits' partial softmaxes into the output. A split of this kernel is
SPLIT_GROUP consecutive splits of the fine count (one unless asked otherwise), their tie quotas summed."""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_gather import _gather_listed_rows, _gather_whole_tiles, _kept_weights, _new_sums
from .decode_split_k import (
    _batch_and_kv_head,
    _last_split,
    _load_split_tile,
    _padded_end,
    _program_rows,
    _program_tie_quotas,
)
from .triton_common import SINK_SCAN_N, _row_sink_ends, _scanned_sink_ends


@triton.jit
def _row_scalar(values, r_local, r: tl.constexpr):
    """Entry r of a program's (R,) row vector, as a scalar."""
    return tl.sum(tl.where(r_local == r, values, 0), axis=0)


@triton.jit
def _block_row(grow, thr, quota, shift, row_ok, r_local, r: tl.constexpr, code_ptr, code_stride, end):
    """Row r of a program of up to 4 rows, as scalars: its global index, its codes' row, threshold, tie quota and
    softmax shift, and the end of its split (0 for an absent row: nothing loaded, nothing kept)."""
    grow_r = _row_scalar(grow, r_local, r)
    return (
        grow_r,
        code_ptr + grow_r * code_stride,
        _row_scalar(thr, r_local, r),
        _row_scalar(quota, r_local, r),
        _row_scalar(shift, r_local, r),
        end * _row_scalar(row_ok.to(tl.int32), r_local, r),
    )


@triton.jit
def _row_codes(code_row, offs_n, row_end, INVALID_CODE: tl.constexpr):
    """One row's (BLOCK_N // 8, 8) tile of codes as int32 (INVALID_CODE past the row's split end)."""
    return tl.load(code_row + offs_n, mask=offs_n < row_end, other=INVALID_CODE).to(tl.int32)


@triton.jit
def _store_row_weights(denominator, keep, shift, code, alpha_log2, weight_at, listed, V_DTYPE: tl.constexpr,
                       V_IS_FP32: tl.constexpr):  # fmt: skip
    """Stores one row's weights of the listed keys (0 where another row kept the key) and returns its running
    denominator, summed inside each thread."""
    p = _kept_weights(keep, shift, code, alpha_log2, V_DTYPE, V_IS_FP32)
    tl.store(weight_at, p, mask=listed)
    return denominator + tl.sum(p, axis=1)


@triton.jit
def _is_sink(code, offs_n, sink_end, INVALID_CODE: tl.constexpr):
    """The keys of a tile of codes that are attention sinks of their row: valid, and before the row's sink end
    (`triton_common.sink_args`)."""
    return (offs_n < sink_end) & (code != INVALID_CODE)


@triton.jit
def _row_keep(code, thr, quota, seen_ties, rank_ties, offs_n, sink_end, SINKS: tl.constexpr,
              INVALID_CODE: tl.constexpr):  # fmt: skip
    """Which keys of one row's (BLOCK_N // 8, 8) tile of codes (each thread's 8 keys contiguous, in index order) are
    kept: distance below the threshold, or at it within the split's quota of ties, the lower index first, and the
    row's attention sinks (SINKS); and the row's running count of ties."""
    tie = code == thr
    if rank_ties:
        tie_count = tie.to(tl.int32)
        thread_ties = tl.sum(tie_count, axis=1)
        before = seen_ties + (tl.cumsum(thread_ties, axis=0) - thread_ties)[:, None]
        keep = (code < thr) | (tie & (before + tl.cumsum(tie_count, axis=1) <= quota))
        seen_ties += tl.sum(thread_ties, axis=0)
    else:
        keep = (code < thr) | (tie & (quota > 0))
    if SINKS:
        keep = keep | _is_sink(code, offs_n, sink_end, INVALID_CODE)
    return keep, seen_ties


@triton.jit(do_not_specialize=("n_keys",))
def _attend_kernel(
    code_ptr,
    stats_ptr,
    quota_ptr,
    v_ptr,
    index_ptr,
    weight_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    keep_ptr,
    ticket_ptr,
    sink_ptr,
    n_keys,
    code_stride,
    rows_per_group,
    query_len,
    group,
    num_kv_heads,
    split_len,
    num_splits,
    count_splits,
    alpha_log2,
    alpha_nonnegative,
    sink_keys,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_oi,
    stride_od,
    DV: tl.constexpr,
    R_BLOCK: tl.constexpr,
    R_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INVALID_CODE: tl.constexpr,
    V_IS_FP32: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROW_FMA: tl.constexpr,
    WRITE_KEEP: tl.constexpr,
    S_BLOCK: tl.constexpr,
    GATHER_STAGES: tl.constexpr,
    SPLIT_GROUP: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    SINKS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    b, hk = _batch_and_kv_head(num_kv_heads)
    r_local = tl.arange(0, R_BLOCK)
    row, row_ok, grow = _program_rows(rows_per_group, R_BLOCK)

    thr = tl.load(stats_ptr + grow * 8 + 4, mask=row_ok, other=-1)
    h_min = tl.load(stats_ptr + grow * 8 + 2, mask=row_ok, other=0)
    # the largest kept logit alpha * (d - 2h): at the smallest distance, or at the threshold if alpha < 0
    shift = tl.where(alpha_nonnegative != 0, h_min, thr)
    quota, ties = _program_tie_quotas(quota_ptr, grow, row_ok, count_splits, SPLIT_GROUP)
    if SINKS == 3:
        sinks = _scanned_sink_ends(code_ptr + grow * code_stride, row_ok, n_keys, 1, sink_keys, INVALID_CODE,
                                   SINK_SCAN_N)  # fmt: skip
    else:
        sinks = _row_sink_ends(sink_ptr, grow, row_ok, sink_keys, SINKS)
    # a split keeps all of its ties or none, except the one where a row's quota runs out: only there are the
    # ties ranked (a scan per block)
    rank_ties = tl.max(((quota > 0) & (quota < ties)).to(tl.int32), axis=0) > 0
    # the split with its padding: codes past n_keys are INVALID_CODE (whole tiles constant over 16 keys: vectorized)
    start = tl.program_id(2) * split_len
    end = _padded_end(split_len, code_stride)
    # this program's list of kept keys (kept by any of its rows) and their weights: capacity split_len
    list_base = ((pid_bh.to(tl.int64) * tl.num_programs(1) + pid_r) * num_splits + pid_s) * split_len
    list_index = index_ptr + list_base
    list_weight = weight_ptr + list_base * R_BLOCK

    if INTERLEAVE:
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        # the running weighted sum of the gathered value rows: the whole tiles of the list are gathered after each
        # selection block already, so that value loads start before the selection ends
        partial, row_denominator = _new_sums(DV, R_DOT, BLOCK_K, ROW_FMA)

    # phase 1: select. Only the codes are read (one byte per key and row), and the keys kept by any row are
    # compacted into the list with their weights, so that phase 2 issues value loads that are all useful.
    if R_BLOCK <= 4:
        # up to 4 rows: one (BLOCK_N // 8, 8) tile per row, each thread's 8 keys contiguous (one 8-byte load), so
        # that the union over the rows and the prefix sums stay inside the thread but for one block scan of a value
        # per thread. A (R, BLOCK_N) tile scans 8 strided values per thread, each across the block (shuffles, shared
        # memory, barriers); a 3-D (R, BLOCK_N // 8, 8) tile had Triton spread the rows over threads.
        keys8 = tl.arange(0, BLOCK_N // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
        num_listed = tl.sum(tl.zeros((R_BLOCK,), dtype=tl.int32), axis=0)
        grow0, code_row0, thr0, quota0, shift0, end0 = _block_row(
            grow, thr, quota, shift, row_ok, r_local, 0, code_ptr, code_stride, end
        )
        seen0 = num_listed
        sink0 = _row_scalar(sinks, r_local, 0)
        gathered = num_listed
        den0 = tl.zeros((BLOCK_N // 8,), dtype=tl.float32)  # per thread: fewer registers
        if ROW_FMA:
            # one row: the gather computes the weights from the row's codes
            gather_codes, gather_shift = code_row0, shift0
        else:
            gather_codes, gather_shift = code_ptr, 0
        if R_BLOCK == 1:
            # one row: its codes a tile ahead (several rows: more registers than the prefetch is worth)
            next0 = tl.load(code_row0 + start + keys8, mask=start + keys8 < end0, other=INVALID_CODE)
        if R_BLOCK > 1:
            grow1, code_row1, thr1, quota1, shift1, end1 = _block_row(
                grow, thr, quota, shift, row_ok, r_local, 1, code_ptr, code_stride, end
            )
            seen1 = num_listed
            sink1 = _row_scalar(sinks, r_local, 1)
            den1 = den0
        if R_BLOCK > 2:
            grow2, code_row2, thr2, quota2, shift2, end2 = _block_row(
                grow, thr, quota, shift, row_ok, r_local, 2, code_ptr, code_stride, end
            )
            seen2 = num_listed
            sink2 = _row_scalar(sinks, r_local, 2)
            den2 = den0
            grow3, code_row3, thr3, quota3, shift3, end3 = _block_row(
                grow, thr, quota, shift, row_ok, r_local, 3, code_ptr, code_stride, end
            )
            seen3 = num_listed
            sink3 = _row_scalar(sinks, r_local, 3)
            den3 = den0
        for block_start in range(start, end, BLOCK_N):
            offs_n = block_start + keys8
            # masked keys and absent rows carry INVALID_CODE > d >= thr: never kept
            if R_BLOCK == 1:
                code0 = next0.to(tl.int32)
                next0 = tl.load(code_row0 + offs_n + BLOCK_N, mask=offs_n + BLOCK_N < end0, other=INVALID_CODE)
            else:
                code0 = _row_codes(code_row0, offs_n, end0, INVALID_CODE)
            keep0, seen0 = _row_keep(code0, thr0, quota0, seen0, rank_ties, offs_n, sink0, SINKS, INVALID_CODE)
            listed = keep0.to(tl.int32)
            if R_BLOCK > 1:
                code1 = _row_codes(code_row1, offs_n, end1, INVALID_CODE)
                keep1, seen1 = _row_keep(code1, thr1, quota1, seen1, rank_ties, offs_n, sink1, SINKS, INVALID_CODE)
                listed = tl.maximum(listed, keep1.to(tl.int32))
            if R_BLOCK > 2:
                code2 = _row_codes(code_row2, offs_n, end2, INVALID_CODE)
                keep2, seen2 = _row_keep(code2, thr2, quota2, seen2, rank_ties, offs_n, sink2, SINKS, INVALID_CODE)
                code3 = _row_codes(code_row3, offs_n, end3, INVALID_CODE)
                keep3, seen3 = _row_keep(code3, thr3, quota3, seen3, rank_ties, offs_n, sink3, SINKS, INVALID_CODE)
                listed = tl.maximum(listed, tl.maximum(keep2.to(tl.int32), keep3.to(tl.int32)))
            # the listed keys: kept by any row
            thread_listed = tl.sum(listed, axis=1)
            slot = num_listed + (tl.cumsum(thread_listed, axis=0) - thread_listed)[:, None] + tl.cumsum(listed, 1) - 1
            listed_here = listed > 0
            tl.store(list_index + slot, offs_n, mask=listed_here)
            num_listed += tl.sum(thread_listed, axis=0)
            if not ROW_FMA:
                # the rows' weights of the listed keys (0 where another row kept the key). With one row and
                # multiply-adds, the gather computes each weight from its code instead (less work here)
                weight_at = list_weight + slot * R_BLOCK
                den0 = _store_row_weights(
                    den0, keep0, shift0, code0, alpha_log2, weight_at, listed_here, v_ptr.dtype.element_ty, V_IS_FP32
                )
                if R_BLOCK > 1:
                    den1 = _store_row_weights(
                        den1,
                        keep1,
                        shift1,
                        code1,
                        alpha_log2,
                        weight_at + 1,
                        listed_here,
                        v_ptr.dtype.element_ty,
                        V_IS_FP32,
                    )
                if R_BLOCK > 2:
                    den2 = _store_row_weights(
                        den2,
                        keep2,
                        shift2,
                        code2,
                        alpha_log2,
                        weight_at + 2,
                        listed_here,
                        v_ptr.dtype.element_ty,
                        V_IS_FP32,
                    )
                    den3 = _store_row_weights(
                        den3,
                        keep3,
                        shift3,
                        code3,
                        alpha_log2,
                        weight_at + 3,
                        listed_here,
                        v_ptr.dtype.element_ty,
                        V_IS_FP32,
                    )
            if WRITE_KEEP:
                tl.store(keep_ptr + grow0 * code_stride + offs_n, keep0.to(tl.int8), mask=offs_n < end0)
                if R_BLOCK > 1:
                    tl.store(keep_ptr + grow1 * code_stride + offs_n, keep1.to(tl.int8), mask=offs_n < end1)
                if R_BLOCK > 2:
                    tl.store(keep_ptr + grow2 * code_stride + offs_n, keep2.to(tl.int8), mask=offs_n < end2)
                    tl.store(keep_ptr + grow3 * code_stride + offs_n, keep3.to(tl.int8), mask=offs_n < end3)
            if INTERLEAVE:
                partial, row_denominator, gathered = _gather_whole_tiles(partial, row_denominator, v_base,
                                                                         list_index, list_weight, gathered,
                                                                         num_listed, gather_codes, gather_shift,
                                                                         alpha_log2, stride_vn, stride_vd, DV,
                                                                         R_BLOCK, R_DOT, BLOCK_K, INVALID_CODE,
                                                                         V_IS_FP32, DOT_FP32, ROW_FMA,
                                                                         GATHER_STAGES, False)  # fmt: skip
        select_totals = tl.where(r_local == 0, tl.sum(den0, axis=0), 0.0)
        if R_BLOCK > 1:
            select_totals += tl.where(r_local == 1, tl.sum(den1, axis=0), 0.0)
        if R_BLOCK > 2:
            select_totals += tl.where(r_local == 2, tl.sum(den2, axis=0), 0.0)
            select_totals += tl.where(r_local == 3, tl.sum(den3, axis=0), 0.0)
    else:
        code_rows = code_ptr + grow[:, None] * code_stride
        seen_ties = tl.zeros((R_BLOCK,), dtype=tl.int32)
        denominators = tl.zeros((R_BLOCK, BLOCK_N), dtype=tl.float32)
        num_listed = tl.sum(seen_ties, axis=0)
        gathered = num_listed
        gather_codes, gather_shift = code_ptr, 0
        offs_next = start + tl.arange(0, BLOCK_N)
        next_code = tl.load(
            code_rows + offs_next[None, :], mask=row_ok[:, None] & (offs_next < end)[None, :], other=INVALID_CODE
        )
        for block_start in range(start, end, BLOCK_N):
            offs_n = block_start + tl.arange(0, BLOCK_N)
            in_bounds = row_ok[:, None] & (offs_n < end)[None, :]
            code = next_code.to(tl.int32)
            offs_next = offs_n + BLOCK_N
            next_code = tl.load(
                code_rows + offs_next[None, :], mask=row_ok[:, None] & (offs_next < end)[None, :], other=INVALID_CODE
            )
            tie = code == thr[:, None]  # masked keys carry INVALID_CODE > d >= thr: never kept
            if rank_ties:
                tie_count = tie.to(tl.int32)
                tie_rank = tl.cumsum(tie_count, axis=1) + seen_ties[:, None]
                keep = (code < thr[:, None]) | (tie & (tie_rank <= quota[:, None]))
                seen_ties += tl.sum(tie_count, axis=1)
            else:
                keep = (code < thr[:, None]) | (tie & (quota > 0)[:, None])
            if SINKS:
                keep = keep | _is_sink(code, offs_n[None, :], sinks[:, None], INVALID_CODE)
            listed_keys = tl.max(keep.to(tl.int32), axis=0)
            slot_keys = num_listed + tl.cumsum(listed_keys, axis=0) - 1
            tl.store(list_index + slot_keys, offs_n, mask=listed_keys > 0)
            # the rows' weights of the listed keys (a row's weight is 0 where another row kept the key)
            p = _kept_weights(keep, shift[:, None], code, alpha_log2, v_ptr.dtype.element_ty, V_IS_FP32)
            denominators += p
            tl.store(list_weight + slot_keys[None, :] * R_BLOCK + r_local[:, None], p, mask=listed_keys[None, :] > 0)
            num_listed += tl.sum(listed_keys, axis=0)
            if WRITE_KEEP:
                tl.store(keep_ptr + grow[:, None] * code_stride + offs_n[None, :], keep.to(tl.int8), mask=in_bounds)
            if INTERLEAVE:
                partial, row_denominator, gathered = _gather_whole_tiles(partial, row_denominator, v_base,
                                                                         list_index, list_weight, gathered,
                                                                         num_listed, gather_codes, gather_shift,
                                                                         alpha_log2, stride_vn, stride_vd, DV,
                                                                         R_BLOCK, R_DOT, BLOCK_K, INVALID_CODE,
                                                                         V_IS_FP32, DOT_FP32, ROW_FMA,
                                                                         GATHER_STAGES, False)  # fmt: skip
        select_totals = tl.sum(denominators, axis=1)

    # the list was written by all threads of this program: make it visible to all of them
    tl.debug_barrier()

    # phase 2: gather the listed value rows (those past the whole tiles gathered already, with INTERLEAVE) and
    # accumulate their weighted sum
    if INTERLEAVE:
        first = tl.multiple_of(gathered, BLOCK_K)
    else:
        first = 0
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        partial, row_denominator = _new_sums(DV, R_DOT, BLOCK_K, ROW_FMA)
    partial, row_denominator = _gather_listed_rows(partial, row_denominator, v_base, list_index, list_weight, first,
                                                   num_listed, gather_codes, gather_shift, alpha_log2, stride_vn,
                                                   stride_vd, DV, R_BLOCK, R_DOT, BLOCK_K, INVALID_CODE, V_IS_FP32,
                                                   DOT_FP32, ROW_FMA, GATHER_STAGES, False)  # fmt: skip
    offs_d = tl.arange(0, DV)
    weight_rows = tl.arange(0, R_DOT)

    if ROW_FMA:
        row_totals = tl.zeros((R_BLOCK,), dtype=tl.float32) + tl.sum(row_denominator, axis=0)
    else:
        row_totals = select_totals
    tl.store(l_ptr + grow * num_splits + pid_s, row_totals, mask=row_ok)
    if ROW_FMA:
        acc_rows = acc_ptr + (grow * num_splits + pid_s) * DV
        tl.store(acc_rows[:, None] + offs_d[None, :], tl.sum(partial, axis=0)[None, :], mask=row_ok[:, None])
    else:
        t_row = pid_r * R_BLOCK + weight_rows
        t_ok = (weight_rows < R_BLOCK) & (t_row < rows_per_group)
        t_grow = pid_bh.to(tl.int64) * rows_per_group + t_row
        acc_rows = acc_ptr + (t_grow * num_splits + pid_s) * DV
        tl.store(acc_rows[:, None] + offs_d[None, :], partial, mask=t_ok[:, None])

    # the last split to finish sums the partial results of the row block, a tile of S_BLOCK splits per load (one tile
    # ahead; S_BLOCK * R_BLOCK * DV is bounded at launch: the tiles and their running sum stay in registers), reduced
    # over the splits once, after the loop
    if _last_split(ticket_ptr, num_splits):
        numerators = tl.zeros((R_BLOCK, S_BLOCK, DV), dtype=tl.float32)
        totals = tl.zeros((R_BLOCK, S_BLOCK), dtype=tl.float32)
        next_numerators, at, ok = _load_split_tile(acc_ptr, grow, row_ok, 0, num_splits, DV, S_BLOCK)
        next_totals = tl.load(l_ptr + at, mask=ok, other=0.0)
        for first in range(0, num_splits, S_BLOCK):
            split_numerators = next_numerators
            split_totals = next_totals
            next_numerators, at, ok = _load_split_tile(acc_ptr, grow, row_ok, first + S_BLOCK, num_splits, DV, S_BLOCK)
            next_totals = tl.load(l_ptr + at, mask=ok, other=0.0)
            numerators += split_numerators
            totals += split_totals
        numerator = tl.sum(numerators, axis=1)
        total = tl.sum(totals, axis=1)
        # a row with no valid key has a zero denominator: zeros, never NaN
        out = tl.where(total[:, None] > 0, numerator / tl.maximum(total, 1e-30)[:, None], 0.0)
        head = hk * group + row // query_len
        out_rows = out_ptr + b * stride_ob + head * stride_oh + (row % query_len) * stride_oi
        tl.store(
            out_rows[:, None] + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None]
        )
