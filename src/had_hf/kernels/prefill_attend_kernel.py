"""Prefill kernel 2 of 2: the softmax of the kept scores times V, streaming the keys in index order with each row's
threshold, tie quota and shift from the threshold kernel."""

from __future__ import annotations

import triton
import triton.language as tl

from .prefill_tiles import _block_ranges, _query_operand, _score_tile, _tile_valid
from .triton_common import _row_sink_ends

GATE = tl.constexpr(1e4)  # the slope of the weights' gate (`_attend_tile`): exp2(-GATE) is 0 in fp32


@triton.jit
def _attend_tile(acc, denominator, seen, q_op, k_base, v_base, m_base, keep_rows, start, offs_m, row_ok, limit,
                 n_keys, threshold, quota, shift, any_partial, upper, alpha_log2, sinks, sinks_end,
                 stride_kn, stride_kd, stride_vn, stride_vd, stride_mi, stride_mn,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_MASK: tl.constexpr, MASK_ROWS: tl.constexpr, MODE: tl.constexpr, SELECT: tl.constexpr,
                 DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, WRITE_KEEP: tl.constexpr,
                 MASKED: tl.constexpr, SINKS: tl.constexpr):  # fmt: skip
    """One key tile of the attend kernel: the kept keys' weights exp(alpha * (Sb - Sb_max)) added to the rows'
    denominators and, times the tile's values, to their accumulators.

    A key is kept when its score reaches the row's cut for this tile: `threshold` (its ties kept) or `threshold + 1`
    (ties dropped; scores step by 2), and in a block where a row's tie quota cuts its ties short, a cut per key from
    the ties' ranks.
    The weights come from one expression, exp2(min(alpha' * (Sb - Sb_max), gate)) with gate = GATE * (Sb - cut): >= 0
    for a kept key (where the first term is <= 0, as Sb <= Sb_max), <= -GATE for the others (weight 0); and without
    boolean tensors: (BLOCK_M, BLOCK_N) masks live in predicate registers, of which a thread has 7 (they spilled
    into general registers, ~2x the instructions of the loop). With attention sinks (SINKS), the tiles before the
    block's last sink end (`sinks_end`) also keep each row's valid keys before its own end (`sinks`)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start + offs_n0
    s = _score_tile(q_op, 0, 0, k_base, start, offs_n0, tl.arange(0, D), n_keys, stride_kn, stride_kd,
                    D, 1, MODE, False, MASKED)  # fmt: skip
    s = s.to(tl.float32)
    if MASKED or HAS_MASK:
        valid = _tile_valid(offs_m, offs_n, row_ok, limit, n_keys, m_base, stride_mi, stride_mn,
                            CAUSAL, HAS_MASK, MASK_ROWS, MASKED)  # fmt: skip
        s = tl.where(valid, s, -D - 4.0)  # below every threshold: never kept, never a tie
    exponent = s * alpha_log2 - (shift * alpha_log2)[:, None]
    if SELECT:
        if any_partial:
            # the ties of the threshold score are kept up to each row's quota, in key order (seen: the row's ties in
            # earlier tiles, room: how many more it keeps). The inclusive rank of each tie inside the tile is a prefix
            # count along the keys on the tensor cores; a tie is kept while its rank is within the row's room
            # (within = 1), and the cut is threshold + 1 otherwise. One expression for every row and tile: a row
            # keeping all the tile's ties has room >= their count, one keeping none room <= 0 (no per-tile decision
            # over the block, which would be a reduction across its warps, a barrier per tile).
            tie = tl.where(s == threshold[:, None], 1.0, 0.0)
            tie_count = tl.sum(tie, axis=1).to(tl.int32)
            room = quota - seen
            rank = tl.dot(tie.to(tl.float16), upper)
            within = tl.minimum(tl.maximum((room + 1).to(tl.float32)[:, None] - rank, 0.0), 1.0)
            gate = s * GATE - ((threshold + 1.0) * GATE)[:, None] + within * GATE
            seen += tie_count
        else:
            gate = s * GATE - (threshold * GATE)[:, None]
        if SINKS:
            if start < sinks_end:
                sink = (offs_n[None, :] < sinks[:, None]) & (s > -D - 4.0)  # invalid keys score -D - 4
                gate = tl.where(sink, 0.0, gate)
    else:
        # floor measurement: every valid key (a dense softmax with a known maximum)
        gate = s * GATE + (D + 3.0) * GATE
    p = tl.exp2(tl.minimum(exponent, gate))
    if WRITE_KEEP:
        at = keep_rows[:, None] + offs_n[None, :]
        tl.store(at, (gate >= 0).to(tl.int8), mask=row_ok[:, None] & (offs_n < n_keys)[None, :])
    denominator += tl.sum(p, axis=1)
    v_at = v_base + offs_n.to(tl.int64)[:, None] * stride_vn + tl.arange(0, DV)[None, :] * stride_vd
    if MASKED:
        v = tl.load(v_at, mask=(offs_n < n_keys)[:, None], other=0.0)
    else:
        v = tl.load(v_at)
    if DOT_FP32:
        acc += tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return acc, denominator, seen


@triton.jit
def _attend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    stats_ptr,
    out_ptr,
    keep_ptr,
    sink_ptr,
    q_len,
    n_keys,
    causal_off,
    group,
    num_heads,
    alpha_log2,
    sink_keys,
    stride_qb,
    stride_qh,
    stride_qi,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mi,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_oi,
    stride_od,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    MODE: tl.constexpr,
    SELECT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WRITE_KEEP: tl.constexpr,
    SINKS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    limit = offs_m + causal_off
    offs_d = tl.arange(0, D)

    q_op = _query_operand(q_ptr, q_ptr + b * stride_qb + h * stride_qh, offs_m, row_ok, offs_d, stride_qi, stride_qd,
                          MODE)  # fmt: skip
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    m_base = mask_ptr + b * stride_mb + h * stride_mh
    grow = pid_bh.to(tl.int64) * q_len + offs_m
    stats = stats_ptr + grow * 4
    threshold = tl.load(stats, mask=row_ok, other=D + 2).to(tl.float32)
    quota = tl.load(stats + 1, mask=row_ok, other=0)
    shift = tl.load(stats + 2, mask=row_ok, other=0).to(tl.float32)
    partial = tl.load(stats + 3, mask=row_ok, other=0)
    any_partial = tl.max(partial, axis=0) > 0
    sinks = _row_sink_ends(sink_ptr, grow, row_ok, sink_keys, SINKS)
    sinks_end = tl.max(sinks, axis=0)
    keep_rows = keep_ptr + grow * n_keys
    # upper[a, b] = 1 where a <= b: (ties) @ upper counts the ties at or before each key of a tile
    ar = tl.arange(0, BLOCK_N)
    upper = (ar[:, None] <= ar[None, :]).to(tl.float16)

    acc = tl.zeros((BLOCK_M, DV), dtype=tl.float32)
    denominator = tl.zeros((BLOCK_M,), dtype=tl.float32)
    seen = tl.zeros((BLOCK_M,), dtype=tl.int32)
    full_end, kv_end = _block_ranges(pid_m, q_len, n_keys, causal_off, BLOCK_M, BLOCK_N, CAUSAL)
    for start in range(0, full_end, BLOCK_N):
        acc, denominator, seen = _attend_tile(
            acc, denominator, seen, q_op, k_base, v_base, m_base, keep_rows, start, offs_m, row_ok, limit, n_keys,
            threshold, quota, shift, any_partial, upper, alpha_log2, sinks, sinks_end, stride_kn, stride_kd,
            stride_vn, stride_vd, stride_mi, stride_mn, D, DV, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, SELECT,
            DOT_FP32, DOT_PRECISION, WRITE_KEEP,
            False, SINKS,
        )  # fmt: skip
    for start in range(full_end, kv_end, BLOCK_N):
        acc, denominator, seen = _attend_tile(
            acc, denominator, seen, q_op, k_base, v_base, m_base, keep_rows, start, offs_m, row_ok, limit, n_keys,
            threshold, quota, shift, any_partial, upper, alpha_log2, sinks, sinks_end, stride_kn, stride_kd,
            stride_vn, stride_vd, stride_mi, stride_mn, D, DV, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, SELECT,
            DOT_FP32, DOT_PRECISION, WRITE_KEEP,
            True, SINKS,
        )  # fmt: skip

    # a row that keeps nothing (no valid key, N = 0) has a zero denominator: zeros, never NaN
    out = tl.where(denominator[:, None] > 0, acc / tl.maximum(denominator, 1e-30)[:, None], 0.0)
    out_at = out_ptr + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_oi
    tl.store(out_at + tl.arange(0, DV)[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
