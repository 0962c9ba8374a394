"""Prefill kernel 1 of 2: each row's threshold level and tie quota by counting rounds (a sample first, then all keys),
and its largest valid score (the softmax shift of the attend kernel)."""

from __future__ import annotations

import triton
import triton.language as tl

from .prefill_tiles import _block_ranges, _query_operand, _query_word, _score_tile, _tile_valid


@triton.jit
def _add_at_least(count, s, cut):
    """count + (s >= cut ? 1 : 0) on fp16 tensors, two keys per instruction: `set` writes 1.0 or 0.0 into each
    half of a word (PTX set.ge.f16x2, which compilers do not emit for a select)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 hit; set.ge.f16x2.f16x2 hit, $2, $3; add.f16x2 $0, $1, hit; }",
        "=r,r,r,r",
        [count, s, tl.broadcast_to(cut.to(tl.float16)[:, None], s.shape)],
        dtype=tl.float16,
        is_pure=True,
        pack=2,
    )


@triton.jit
def _count_cuts(s, v0, v1, v2, v3, c0, c1, c2, c3, PACKED: tl.constexpr):
    """Adds the tile's keys with score >= v_j to per-lane counters (masked keys carry a score below all cuts).

    The counters are (BLOCK_M, BLOCK_N) tensors, one value per lane position, summed over the keys once per chunk of
    COUNT_CHUNK tiles (`_lane_totals`). PACKED (the GPU, fp16 scores): fp16 counters, a compare and an add per pair
    of keys and cut (`_add_at_least`); else fp32 counters, a compare that writes 1.0 or 0.0 (FSET) and an add per
    key and cut."""
    if PACKED:
        c0 = _add_at_least(c0, s, v0)
        c1 = _add_at_least(c1, s, v1)
        c2 = _add_at_least(c2, s, v2)
        c3 = _add_at_least(c3, s, v3)
    else:
        c0 += tl.where(s >= v0.to(s.dtype)[:, None], 1.0, 0.0)
        c1 += tl.where(s >= v1.to(s.dtype)[:, None], 1.0, 0.0)
        c2 += tl.where(s >= v2.to(s.dtype)[:, None], 1.0, 0.0)
        c3 += tl.where(s >= v3.to(s.dtype)[:, None], 1.0, 0.0)
    return c0, c1, c2, c3


@triton.jit
def _lane_totals(t0, t1, t2, t3, c0, c1, c2, c3):
    """Adds the per-lane counters' row sums to the rows' int32 totals and returns the counters cleared (fp16
    counters are exact up to 2048 counts: a chunk of COUNT_CHUNK <= 2048 tiles, a sample, or a block's masked
    tiles)."""
    t0 += tl.sum(c0.to(tl.float32), axis=1).to(tl.int32)
    t1 += tl.sum(c1.to(tl.float32), axis=1).to(tl.int32)
    t2 += tl.sum(c2.to(tl.float32), axis=1).to(tl.int32)
    t3 += tl.sum(c3.to(tl.float32), axis=1).to(tl.int32)
    zero = tl.zeros(c0.shape, dtype=c0.dtype)
    return t0, t1, t2, t3, zero, zero, zero, zero


@triton.jit
def _count_sweep(q_op, qw0, qw1, k_base, m_base, offs_m, row_ok, limit, n_keys, full_end, kv_end, range_tiles,
                 v0, v1, v2, v3, smax, stride_kn, stride_kd, stride_mi, stride_mn,
                 D: tl.constexpr, W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_ROWS: tl.constexpr, MODE: tl.constexpr,
                 USE_POPC: tl.constexpr, PACKED: tl.constexpr, COUNT_CHUNK: tl.constexpr, SAMPLE_TILES: tl.constexpr,
                 SAMPLE: tl.constexpr, COUNT: tl.constexpr):  # fmt: skip
    """One sweep over the row block's keys (SAMPLE: over SAMPLE_TILES tiles spread evenly over them): per row, the
    valid keys with score >= v_j for the 4 cuts, and the largest valid score (`smax`, not tracked on samples)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    lane_dtype: tl.constexpr = tl.float16 if PACKED else tl.float32
    c0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=lane_dtype)
    c1 = c0
    c2 = c0
    c3 = c0
    t0 = tl.zeros((BLOCK_M,), dtype=tl.int32)
    t1 = t0
    t2 = t0
    t3 = t0
    low = -D - 4  # below every cut (cuts are scores >= 2 - D) and every valid score
    # the scores' own type: fp16 (PACKED), fp32 (fp16 dots) or int32 (int8 dots, popcount)
    score_dtype: tl.constexpr = tl.float16 if PACKED else (tl.float32 if MODE == 0 else tl.int32)
    lane_max = tl.full((BLOCK_M, BLOCK_N), low, dtype=score_dtype)  # per lane: one max per key, one row max per sweep
    if SAMPLE:
        for i in range(0, SAMPLE_TILES):
            start = ((2 * i + 1) * range_tiles // (2 * SAMPLE_TILES)) * BLOCK_N
            s = _score_tile(q_op, qw0, qw1, k_base, start, offs_n0, offs_d, n_keys, stride_kn, stride_kd,
                            D, W, MODE, USE_POPC, True, PACKED)  # fmt: skip
            valid = _tile_valid(offs_m, start + offs_n0, row_ok, limit, n_keys, m_base, stride_mi, stride_mn,
                                CAUSAL, HAS_MASK, MASK_ROWS, True)  # fmt: skip
            s = tl.where(valid, s, low)
            c0, c1, c2, c3 = _count_cuts(s, v0, v1, v2, v3, c0, c1, c2, c3, PACKED)
    else:
        for chunk in range(0, full_end, COUNT_CHUNK * BLOCK_N):
            for start in range(chunk, tl.minimum(chunk + COUNT_CHUNK * BLOCK_N, full_end), BLOCK_N):
                s = _score_tile(q_op, qw0, qw1, k_base, start, offs_n0, offs_d, n_keys, stride_kn, stride_kd,
                                D, W, MODE, USE_POPC, False, PACKED)  # fmt: skip
                if HAS_MASK:
                    valid = _tile_valid(offs_m, start + offs_n0, row_ok, limit, n_keys, m_base, stride_mi,
                                        stride_mn, CAUSAL, HAS_MASK, MASK_ROWS, False)  # fmt: skip
                    s = tl.where(valid, s, low)
                if COUNT:
                    c0, c1, c2, c3 = _count_cuts(s, v0, v1, v2, v3, c0, c1, c2, c3, PACKED)
                lane_max = tl.maximum(lane_max, s)
            t0, t1, t2, t3, c0, c1, c2, c3 = _lane_totals(t0, t1, t2, t3, c0, c1, c2, c3)
        for start in range(full_end, kv_end, BLOCK_N):  # BLOCK_M / BLOCK_N + 1 tiles at most
            s = _score_tile(q_op, qw0, qw1, k_base, start, offs_n0, offs_d, n_keys, stride_kn, stride_kd,
                            D, W, MODE, USE_POPC, True, PACKED)  # fmt: skip
            valid = _tile_valid(offs_m, start + offs_n0, row_ok, limit, n_keys, m_base, stride_mi, stride_mn,
                                CAUSAL, HAS_MASK, MASK_ROWS, True)  # fmt: skip
            s = tl.where(valid, s, low)
            if COUNT:
                c0, c1, c2, c3 = _count_cuts(s, v0, v1, v2, v3, c0, c1, c2, c3, PACKED)
            lane_max = tl.maximum(lane_max, s)
        smax = tl.maximum(smax, tl.max(lane_max, axis=1).to(tl.float32))
    t0, t1, t2, t3, c0, c1, c2, c3 = _lane_totals(t0, t1, t2, t3, c0, c1, c2, c3)
    return t0, t1, t2, t3, smax


@triton.jit
def _place_cuts(A, B, guess, use_guess):
    """The 4 cut levels of a round inside (A, B]: all of them when B - A <= 4 (the round resolves the row); a window
    of 4 consecutive levels around `guess` (use_guess); else spread evenly (the interval shrinks about 5x)."""
    span = B - A
    small = span <= 4
    window = (use_guess != 0) & (span > 4)
    start = tl.minimum(tl.maximum(guess - 1, A + 1), B - 3)
    p0 = tl.where(small, tl.minimum(A + 1, B), tl.where(window, start, A + span // 5))
    p1 = tl.where(small, tl.minimum(A + 2, B), tl.where(window, start + 1, A + (2 * span) // 5))
    p2 = tl.where(small, tl.minimum(A + 3, B), tl.where(window, start + 2, A + (3 * span) // 5))
    p3 = tl.where(small, tl.minimum(A + 4, B), tl.where(window, start + 3, A + (4 * span) // 5))
    return p0, p1, p2, p3


@triton.jit
def _narrow(A, B, count_a, count_b1, p0, p1, p2, p3, c0, c1, c2, c3, target, pending):
    """Narrows [A, B] (count(u >= A) >= target > count(u >= B + 1)) by the counts c_j = count(u >= p_j) of a round;
    rows not pending keep theirs. Counts fall as cuts rise, so the cuts with c_j >= target are the first j."""
    j = (c0 >= target).to(tl.int32) + (c1 >= target).to(tl.int32) + (c2 >= target).to(tl.int32)
    j += (c3 >= target).to(tl.int32)
    new_a = tl.where(j == 0, A, tl.where(j == 1, p0, tl.where(j == 2, p1, tl.where(j == 3, p2, p3))))
    new_ca = tl.where(j == 0, count_a, tl.where(j == 1, c0, tl.where(j == 2, c1, tl.where(j == 3, c2, c3))))
    new_b = tl.where(j == 0, p0 - 1, tl.where(j == 1, p1 - 1, tl.where(j == 2, p2 - 1, tl.where(j == 3, p3 - 1, B))))
    new_cb1 = tl.where(j == 0, c0, tl.where(j == 1, c1, tl.where(j == 2, c2, tl.where(j == 3, c3, count_b1))))
    return (
        tl.where(pending, new_a, A),
        tl.where(pending, new_b, B),
        tl.where(pending, new_ca, count_a),
        tl.where(pending, new_cb1, count_b1),
    )


@triton.jit
def _rounds(q_op, qw0, qw1, k_base, m_base, offs_m, row_ok, limit, n_keys, full_end, kv_end, range_tiles,
            target, guess, has_guess, smax, stride_kn, stride_kd, stride_mi, stride_mn,
            D: tl.constexpr, W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_ROWS: tl.constexpr, MODE: tl.constexpr,
            USE_POPC: tl.constexpr, PACKED: tl.constexpr, COUNT_CHUNK: tl.constexpr, SAMPLE_TILES: tl.constexpr,
            SAMPLE: tl.constexpr, MAX_ROUNDS: tl.constexpr):  # fmt: skip
    """Counting rounds until every row with a positive target has its level interval narrowed to one level A: the
    target-th largest level u = (Sb + d) / 2. Returns A, count(u >= A) (2^30 where never counted: level 0),
    count(u >= A + 1) and the largest valid score."""
    A = tl.zeros((BLOCK_M,), dtype=tl.int32)
    B = A + D
    count_a = A + (1 << 30)
    count_b1 = A
    live = row_ok & (target > 0)
    pending = tl.max((live & (A != B)).to(tl.int32), axis=0)
    rounds = pending * 0
    while pending > 0:
        use_guess = has_guess * (rounds == 0)
        p0, p1, p2, p3 = _place_cuts(A, B, guess, use_guess)
        c0, c1, c2, c3, smax = _count_sweep(
            q_op, qw0, qw1, k_base, m_base, offs_m, row_ok, limit, n_keys, full_end, kv_end, range_tiles,
            2 * p0 - D, 2 * p1 - D, 2 * p2 - D, 2 * p3 - D, smax, stride_kn, stride_kd, stride_mi, stride_mn,
            D, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, USE_POPC, PACKED, COUNT_CHUNK, SAMPLE_TILES,
            SAMPLE, True,
        )  # fmt: skip
        A, B, count_a, count_b1 = _narrow(
            A, B, count_a, count_b1, p0, p1, p2, p3, c0, c1, c2, c3, target, live & (A != B)
        )
        rounds += 1
        pending = tl.max((live & (A != B)).to(tl.int32), axis=0) * (rounds < MAX_ROUNDS)
    return A, count_a, count_b1, smax


@triton.jit
def _threshold_kernel(
    q_ptr,
    k_ptr,
    mask_ptr,
    nk_ptr,
    stats_ptr,
    q_len,
    n_keys,
    causal_off,
    group,
    num_heads,
    stride_qb,
    stride_qh,
    stride_qi,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mi,
    stride_mn,
    stride_nb,
    stride_nh,
    stride_ni,
    D: tl.constexpr,
    W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    MODE: tl.constexpr,
    USE_POPC: tl.constexpr,
    PACKED: tl.constexpr,
    COUNT_CHUNK: tl.constexpr,
    SAMPLE_TILES: tl.constexpr,
    COUNT: tl.constexpr,
    MAX_ROUNDS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # the longest rows first: no long program left for a last wave
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q_len
    limit = offs_m + causal_off  # the last key each row may attend (causal)
    offs_d = tl.arange(0, D)

    q_base = q_ptr + b * stride_qb + h * stride_qh
    if MODE == 2:
        q_op = 0
        qw0 = _query_word(q_ptr, q_base, offs_m, row_ok, 0, stride_qi, stride_qd)
        qw1 = qw0
        if W > 1:
            qw1 = _query_word(q_ptr, q_base, offs_m, row_ok, 1, stride_qi, stride_qd)
    else:
        q_op = _query_operand(q_ptr, q_base, offs_m, row_ok, offs_d, stride_qi, stride_qd, MODE)
        qw0 = 0
        qw1 = 0
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    m_base = mask_ptr + b * stride_mb + h * stride_mh
    num_kept = tl.load(nk_ptr + b * stride_nb + h * stride_nh + offs_m.to(tl.int64) * stride_ni, mask=row_ok, other=0)
    full_end, kv_end = _block_ranges(pid_m, q_len, n_keys, causal_off, BLOCK_M, BLOCK_N, CAUSAL)
    range_tiles = tl.cdiv(kv_end, BLOCK_N)
    smax = tl.full((BLOCK_M,), -D - 4, dtype=tl.float32)

    if COUNT:
        guess = tl.zeros((BLOCK_M,), dtype=tl.int32)
        has_guess = 0
        if range_tiles > SAMPLE_TILES:
            # the sample's own threshold level, its target scaled by the share of the keys it covers
            sample_keys = SAMPLE_TILES * BLOCK_N
            scaled = (num_kept.to(tl.int64) * sample_keys + kv_end // 2) // kv_end
            sample_target = tl.where(num_kept > 0, tl.maximum(scaled.to(tl.int32), 1), 0)
            guess, _, _, _ = _rounds(
                q_op, qw0, qw1, k_base, m_base, offs_m, row_ok, limit, n_keys, full_end, kv_end, range_tiles,
                sample_target, guess, 0, smax, stride_kn, stride_kd, stride_mi, stride_mn,
                D, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, USE_POPC, PACKED, COUNT_CHUNK,
                SAMPLE_TILES, True, MAX_ROUNDS,
            )  # fmt: skip
            has_guess = 1
        level, count_ge, count_gt, smax = _rounds(
            q_op, qw0, qw1, k_base, m_base, offs_m, row_ok, limit, n_keys, full_end, kv_end, range_tiles,
            num_kept, guess, has_guess, smax, stride_kn, stride_kd, stride_mi, stride_mn,
            D, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, USE_POPC, PACKED, COUNT_CHUNK,
            SAMPLE_TILES, False, MAX_ROUNDS,
        )  # fmt: skip
    else:
        # floor measurement: the scores and their maximum alone, no counting (the stats are meaningless)
        zero = tl.zeros((BLOCK_M,), dtype=tl.int32)
        _, _, _, _, smax = _count_sweep(
            q_op, qw0, qw1, k_base, m_base, offs_m, row_ok, limit, n_keys, full_end, kv_end, range_tiles,
            zero, zero, zero, zero, smax, stride_kn, stride_kd, stride_mi, stride_mn,
            D, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, USE_POPC, PACKED, COUNT_CHUNK,
            SAMPLE_TILES, False, False,
        )  # fmt: skip
        level = zero
        count_ge = zero
        count_gt = zero

    live = row_ok & (num_kept > 0)
    quota = num_kept - count_gt
    # the quota cuts the ties of the threshold level short: the attend kernel ranks them (count_ge is 2^30 where the
    # level was never counted, level 0: ranked too, which is always exact)
    partial = live & (quota < count_ge - count_gt)
    threshold = tl.where(live, 2 * level - D, D + 2)  # D + 2: above every score, nothing kept
    stats = stats_ptr + (pid_bh.to(tl.int64) * q_len + offs_m) * 4
    tl.store(stats, threshold, mask=row_ok)
    tl.store(stats + 1, tl.where(live, quota, 0), mask=row_ok)
    tl.store(stats + 2, tl.where(live, smax, 0.0).to(tl.int32), mask=row_ok)
    tl.store(stats + 3, partial.to(tl.int32), mask=row_ok)
