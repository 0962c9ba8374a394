"""Triton kernels for HAD prefill: exact top-N Hamming attention of many query positions, memory linear in n.

Dense attention of q query positions against n keys is tiled like FlashAttention: a program owns a block of
BLOCK_M query rows of one (batch, query head) and streams the keys in tiles of BLOCK_N, so no (q x n) tensor exists.
HAD adds a selection: each row keeps exactly N keys (METHOD.md section 1: the largest binary scores, the lower key
index first among equal scores, never a masked key). Binary scores take only d + 1 values, Sb = 2u - d with u the
number of agreeing signs, so the kept set of a row is described by three numbers: a threshold level t, the count of
keys above it, and a tie quota (how many keys AT the threshold are kept, the first ones in index order). Two kernels,
each one pass over the keys per round:

1. `_threshold_kernel` finds t and the quota of every row by counting. A round places 4 cuts p0 < p1 < p2 < p3 per
   row and counts, in one sweep over the row's keys, the valid keys with u >= p_j. The counts narrow the interval
   [A, B] of levels that holds t (count(u >= A) >= N > count(u >= B + 1)); the row is resolved when A == B, and
   then count(u > t) and the tie quota N - count(u > t) are known exactly. Rounds repeat over the whole row block
   until all its rows are resolved (an interval of at most 4 levels is resolved in one round, a wider one shrinks
   about 5x per round). To make one round enough, the first round's cuts are a window of 4 consecutive levels
   (resolving t in g - 1 .. g + 1) around an estimate g: the same rounds run first on a sample of SAMPLE_TILES key
   tiles spread evenly over the row block's key range (n / 16 keys, 256 to 1024, by default), with the target scaled
   to the sample, N * sample / range. For random keys the sample's quantile is then within a level of t for nearly
   every row (its standard error is 0.2 to 0.4 levels), so a row block usually costs 3 or 4 sweeps over the sample
   plus one over all keys. A block whose key range is no longer than the sample is counted whole (2 to 4 rounds
   over a few tiles). The sweep over all keys also takes each row's largest valid score, the softmax shift of the
   second kernel. The counts live in per-lane fp32 counters, (BLOCK_M, BLOCK_N) per cut, summed over the keys once
   per sweep: a compare that writes 1.0 or 0.0 and an add per cut and key (370 instructions per 128 x 64 tile and
   thread at 8 warps in sm_90 SASS, against 568 for a row sum of integer indicators per tile).
2. `_attend_kernel` streams the key and value tiles again, in increasing key order, and accumulates
   exp(alpha * (Sb - Sb_max)) V over the kept keys: Sb > t, or Sb == t among the first `quota` ties of the row. The
   row's largest score is known, so the softmax needs no running maximum and no rescaling. Per tile each row has a
   cut: t where the tile's ties are all within its quota, t + 1 where none is (scores step by 2). Rows whose quota is
   smaller than their number of ties (the usual case) count the ties seen so far; only a tile where some row's count
   crosses its quota needs a cut per key, from the ties' ranks inside the tile: an inclusive prefix count along the
   keys, computed on the tensor cores as a product with a (BLOCK_N x BLOCK_N) upper-triangular matrix of ones (exact:
   integers below 2^11 in fp16 products with fp32 accumulation). The weights are one expression,
   exp2(alpha' * (Sb - Sb_max) + min(1e4 * (Sb - cut), 0)), with no (BLOCK_M, BLOCK_N) boolean tensors: those live
   in predicate registers, 7 per thread, and spilling them into general registers made the loop ~2x longer.

Scores: the signs of queries and keys as ±1 fp16 tiles and `tl.dot` with fp32 accumulation (exact: |Sb| <= d <=
128), by default. The threshold kernel can also compute them as int8 ±1 dots (int32 accumulation) or as XOR/popcount
of packed sign words, to measure which is faster (`score_mode`; popcount needs d / 32 POPC per score, which run at 16
per clock and multiprocessor against 128 fp32 operations: more time than the tensor-core dot and the counting
together); the attend kernel takes fp16 or int8 dots.
The keys' signs are converted once per call into a (B, Hkv, n, d) ±1 tensor (fp16 or int8) that the kernels read as
tiles.

Masks: the keys past the causal limit (query i of the last q positions attends keys j <= i + n - q) are skipped
tile by tile and masked inside the diagonal tiles; a padding mask is read per key when it does not vary over the
query positions (the usual (B, 1, 1, n)), per (row, key) otherwise. Grouped-query attention: query head h reads kv
head h // (Hq / Hkv), no copy. A row with N = 0 (no valid key) keeps nothing and outputs zeros.

Memory: the output, the ±1 keys (n x d per kv head), and 16 bytes per query row (threshold, quota, largest score,
a flag) between the kernels. `return_keep` (tests) adds a (q x n) byte mask.

The kernels run on CUDA and, for tests, on the CPU through Triton's interpreter (`TRITON_INTERPRET=1` before
`triton` is imported).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .packing import WORD_BITS, as_int32_words, pack_sign_bits, unpack_sign_bits
from .triton_decode import _on_device, _popcount

__all__ = [
    "PrefillConfig",
    "default_prefill_config",
    "hamming_topk_prefill",
    "prefill_attend_pass",
    "prefill_threshold_pass",
    "prepare_prefill",
    "supports_prefill",
]

SCORE_MODES = {"dot16": 0, "dot8": 1, "popcount": 2}
# counting rounds of a row block: the interval of levels shrinks at every round that leaves a row unresolved (about
# 5x, and one round resolves 4 levels), so 129 levels need at most 5; the cap only guards against a bug looping
MAX_ROUNDS = 16


@functools.cache
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------------------------
# shared tile helpers
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _score_tile(q_op, qw0, qw1, k_base, start, offs_n0, offs_d, n_keys, stride_kn, stride_kd,
                D: tl.constexpr, W: tl.constexpr, MODE: tl.constexpr, USE_POPC: tl.constexpr,
                BOUNDS: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_N) binary scores of the program's rows against the keys start .. start + BLOCK_N - 1: fp32
    from a ±1 fp16 dot (MODE 0), int32 from a ±1 int8 dot (MODE 1) or from XOR/popcount of sign words (MODE 2).
    BOUNDS: the tile may reach past n_keys (those keys' scores are garbage: the caller masks them)."""
    offs_n = start + offs_n0
    if MODE == 2:
        k_at = k_base + offs_n.to(tl.int64) * stride_kn
        if BOUNDS:
            k0 = tl.load(k_at, mask=offs_n < n_keys, other=0)
        else:
            k0 = tl.load(k_at)
        dist = _popcount(qw0 ^ k0[None, :], USE_POPC)
        if W > 1:
            if BOUNDS:
                k1 = tl.load(k_at + stride_kd, mask=offs_n < n_keys, other=0)
            else:
                k1 = tl.load(k_at + stride_kd)
            dist += _popcount(qw1 ^ k1[None, :], USE_POPC)
        s = D - 2 * dist
    else:
        k_at = k_base + offs_d[:, None] * stride_kd + offs_n.to(tl.int64)[None, :] * stride_kn
        if BOUNDS:
            kt = tl.load(k_at, mask=(offs_n < n_keys)[None, :], other=0)
        else:
            kt = tl.load(k_at)
        s = tl.dot(q_op, kt)
    return s


@triton.jit
def _tile_valid(offs_m, offs_n, row_ok, limit, n_keys, m_base, stride_mi, stride_mn,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_ROWS: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_N) keys a row may attend: in range and not in its causal future (MASKED tiles only: the
    others are known to be whole and in everybody's past), and allowed by the padding mask (HAS_MASK)."""
    valid = (offs_n < n_keys)[None, :] & row_ok[:, None]
    if MASKED and CAUSAL:
        valid = valid & (offs_n[None, :] <= limit[:, None])
    if HAS_MASK:
        if MASK_ROWS:
            at = m_base + offs_m.to(tl.int64)[:, None] * stride_mi + offs_n.to(tl.int64)[None, :] * stride_mn
            allowed = tl.load(at, mask=valid, other=0)
        else:
            allowed = tl.load(m_base + offs_n.to(tl.int64) * stride_mn, mask=offs_n < n_keys, other=0)[None, :]
        valid = valid & (allowed != 0)
    return valid


@triton.jit
def _query_operand(q_ptr, q_base, offs_m, row_ok, offs_d, stride_qi, stride_qd, MODE: tl.constexpr):
    """The rows' ±1 query signs as the left operand of the score dot (fp16, or int8 for MODE 1)."""
    q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * stride_qi + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
    # (compared in fp32: the interpreter compares bf16 values by their bits)
    if MODE == 1:
        op = tl.where(q >= 0, 1, -1).to(tl.int8)
    else:
        op = tl.where(q >= 0, 1.0, -1.0).to(tl.float16)
    return op


@triton.jit
def _query_word(qw_ptr, qw_base, offs_m, row_ok, word, stride_qi, stride_qw):
    """(BLOCK_M, 1) packed sign word `word` of the rows' queries (MODE 2)."""
    w = tl.load(qw_base + offs_m.to(tl.int64) * stride_qi + word * stride_qw, mask=row_ok, other=0)
    return w[:, None]


@triton.jit
def _block_ranges(pid_m, q_len, n_keys, causal_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):  # fmt: skip
    """The keys of a row block: [0, full_end) whole tiles every row may attend (as far as causality and n go), and
    [full_end, kv_end) the tiles that need a mask."""
    if CAUSAL:
        first_row = pid_m * BLOCK_M
        last_row = tl.minimum(first_row + BLOCK_M, q_len) - 1
        kv_end = tl.maximum(tl.minimum(n_keys, last_row + causal_off + 1), 0)
        full_end = (tl.maximum(tl.minimum(n_keys, first_row + causal_off + 1), 0) // BLOCK_N) * BLOCK_N
    else:
        kv_end = n_keys
        full_end = (n_keys // BLOCK_N) * BLOCK_N
    return full_end, kv_end


# ----------------------------------------------------------------------------------------------------------------------
# pass 1: thresholds and tie quotas by counting rounds
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _count_cuts(s, v0, v1, v2, v3, c0, c1, c2, c3):
    """Adds the tile's keys with score >= v_j to per-lane counters (masked keys carry a score below all cuts).

    The counters are (BLOCK_M, BLOCK_N) fp32 tensors, one value per lane position, summed over the keys once after
    the sweep: a compare that writes 1.0 or 0.0 (FSET) and an add per cut and key, half the instructions of a
    per-tile row sum of integer indicators."""
    c0 += tl.where(s >= v0.to(s.dtype)[:, None], 1.0, 0.0)
    c1 += tl.where(s >= v1.to(s.dtype)[:, None], 1.0, 0.0)
    c2 += tl.where(s >= v2.to(s.dtype)[:, None], 1.0, 0.0)
    c3 += tl.where(s >= v3.to(s.dtype)[:, None], 1.0, 0.0)
    return c0, c1, c2, c3


@triton.jit
def _count_sweep(q_op, qw0, qw1, k_base, m_base, offs_m, row_ok, limit, n_keys, full_end, kv_end, range_tiles,
                 v0, v1, v2, v3, smax, stride_kn, stride_kd, stride_mi, stride_mn,
                 D: tl.constexpr, W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_ROWS: tl.constexpr, MODE: tl.constexpr,
                 USE_POPC: tl.constexpr, SAMPLE_TILES: tl.constexpr, SAMPLE: tl.constexpr,
                 COUNT: tl.constexpr):  # fmt: skip
    """One sweep over the row block's keys (SAMPLE: over SAMPLE_TILES tiles spread evenly over them): per row, the
    valid keys with score >= v_j for the 4 cuts, and the largest valid score (`smax`, not tracked on samples)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    c0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c1 = c0
    c2 = c0
    c3 = c0
    low = -D - 4  # below every cut (cuts are scores >= 2 - D) and every valid score
    if SAMPLE:
        for i in range(0, SAMPLE_TILES):
            start = ((2 * i + 1) * range_tiles // (2 * SAMPLE_TILES)) * BLOCK_N
            s = _score_tile(q_op, qw0, qw1, k_base, start, offs_n0, offs_d, n_keys, stride_kn, stride_kd,
                            D, W, MODE, USE_POPC, True)  # fmt: skip
            valid = _tile_valid(offs_m, start + offs_n0, row_ok, limit, n_keys, m_base, stride_mi, stride_mn,
                                CAUSAL, HAS_MASK, MASK_ROWS, True)  # fmt: skip
            s = tl.where(valid, s, low)
            c0, c1, c2, c3 = _count_cuts(s, v0, v1, v2, v3, c0, c1, c2, c3)
    else:
        for start in range(0, full_end, BLOCK_N):
            s = _score_tile(q_op, qw0, qw1, k_base, start, offs_n0, offs_d, n_keys, stride_kn, stride_kd,
                            D, W, MODE, USE_POPC, False)  # fmt: skip
            if HAS_MASK:
                valid = _tile_valid(offs_m, start + offs_n0, row_ok, limit, n_keys, m_base, stride_mi, stride_mn,
                                    CAUSAL, HAS_MASK, MASK_ROWS, False)  # fmt: skip
                s = tl.where(valid, s, low)
            if COUNT:
                c0, c1, c2, c3 = _count_cuts(s, v0, v1, v2, v3, c0, c1, c2, c3)
            smax = tl.maximum(smax, tl.max(s, axis=1).to(tl.float32))
        for start in range(full_end, kv_end, BLOCK_N):
            s = _score_tile(q_op, qw0, qw1, k_base, start, offs_n0, offs_d, n_keys, stride_kn, stride_kd,
                            D, W, MODE, USE_POPC, True)  # fmt: skip
            valid = _tile_valid(offs_m, start + offs_n0, row_ok, limit, n_keys, m_base, stride_mi, stride_mn,
                                CAUSAL, HAS_MASK, MASK_ROWS, True)  # fmt: skip
            s = tl.where(valid, s, low)
            if COUNT:
                c0, c1, c2, c3 = _count_cuts(s, v0, v1, v2, v3, c0, c1, c2, c3)
            smax = tl.maximum(smax, tl.max(s, axis=1).to(tl.float32))
    # (exact: fp32 holds integers up to 2^24)
    return (
        tl.sum(c0, axis=1).to(tl.int32),
        tl.sum(c1, axis=1).to(tl.int32),
        tl.sum(c2, axis=1).to(tl.int32),
        tl.sum(c3, axis=1).to(tl.int32),
        smax,
    )


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
            USE_POPC: tl.constexpr, SAMPLE_TILES: tl.constexpr, SAMPLE: tl.constexpr,
            MAX_ROUNDS: tl.constexpr):  # fmt: skip
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
            D, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, USE_POPC, SAMPLE_TILES, SAMPLE, True,
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
                D, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, USE_POPC, SAMPLE_TILES, True, MAX_ROUNDS,
            )  # fmt: skip
            has_guess = 1
        level, count_ge, count_gt, smax = _rounds(
            q_op, qw0, qw1, k_base, m_base, offs_m, row_ok, limit, n_keys, full_end, kv_end, range_tiles,
            num_kept, guess, has_guess, smax, stride_kn, stride_kd, stride_mi, stride_mn,
            D, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, USE_POPC, SAMPLE_TILES, False, MAX_ROUNDS,
        )  # fmt: skip
    else:
        # floor measurement: the scores and their maximum alone, no counting (the stats are meaningless)
        zero = tl.zeros((BLOCK_M,), dtype=tl.int32)
        _, _, _, _, smax = _count_sweep(
            q_op, qw0, qw1, k_base, m_base, offs_m, row_ok, limit, n_keys, full_end, kv_end, range_tiles,
            zero, zero, zero, zero, smax, stride_kn, stride_kd, stride_mi, stride_mn,
            D, W, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, USE_POPC, SAMPLE_TILES, False, False,
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


# ----------------------------------------------------------------------------------------------------------------------
# pass 2: softmax of the kept scores times V
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _attend_tile(acc, denominator, seen, q_op, k_base, v_base, m_base, keep_rows, start, offs_m, row_ok, limit,
                 n_keys, threshold, quota, shift, any_partial, upper, alpha_log2,
                 stride_kn, stride_kd, stride_vn, stride_vd, stride_mi, stride_mn,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_MASK: tl.constexpr, MASK_ROWS: tl.constexpr, MODE: tl.constexpr, SELECT: tl.constexpr,
                 DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, WRITE_KEEP: tl.constexpr,
                 MASKED: tl.constexpr):  # fmt: skip
    """One key tile of the attend kernel: the kept keys' weights exp(alpha * (Sb - Sb_max)) added to the rows'
    denominators and, times the tile's values, to their accumulators.

    A key is kept when its score reaches the row's threshold for this tile, `threshold` (ties kept) or
    `threshold + 1` (ties dropped), and a tile where some row's quota runs out in the middle gets a threshold per
    key. The weights come from one expression, exp2(alpha' * (Sb - Sb_max) + min(BIG * (Sb - cut), 0)), without
    boolean tensors: (BLOCK_M, BLOCK_N) masks live in predicate registers, of which a thread has 7 (they spilled
    into general registers, ~2x the instructions of the loop)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = start + offs_n0
    s = _score_tile(q_op, 0, 0, k_base, start, offs_n0, tl.arange(0, D), n_keys, stride_kn, stride_kd,
                    D, 1, MODE, False, MASKED)  # fmt: skip
    s = s.to(tl.float32)
    if MASKED or HAS_MASK:
        valid = _tile_valid(offs_m, offs_n, row_ok, limit, n_keys, m_base, stride_mi, stride_mn,
                            CAUSAL, HAS_MASK, MASK_ROWS, MASKED)  # fmt: skip
        s = tl.where(valid, s, -D - 4.0)  # below every threshold: never kept, never a tie
    exponent = (s - shift[:, None]) * alpha_log2
    if WRITE_KEEP:
        kept = tl.zeros(s.shape, dtype=tl.int8)
    if SELECT:
        if any_partial:
            # the ties of the threshold score are kept up to each row's quota, in key order (seen: the row's ties in
            # earlier tiles)
            tie = s == threshold[:, None]
            tie_count = tl.sum(tl.where(tie, 1.0, 0.0), axis=1).to(tl.int32)
            crossing = (seen < quota) & (seen + tie_count > quota)
            # rows whose quota does not run out inside the tile keep all their ties here, or none
            row_cut = tl.where(seen + tie_count <= quota, threshold, threshold + 1.0)
            if tl.max(crossing.to(tl.int32), axis=0) > 0:
                # inclusive rank of each tie inside the tile: a prefix count along the keys on the tensor cores
                rank = tl.dot(tie.to(tl.float16), upper)
                room = tl.where(crossing, quota - seen, -1).to(tl.float32)
                cut = tl.where(tie & (rank <= room[:, None]), threshold[:, None], row_cut[:, None])
                p = tl.exp2(exponent + tl.minimum((s - cut) * 1e4, 0.0))
                if WRITE_KEEP:
                    kept = (s >= cut).to(tl.int8)
            else:
                p = tl.exp2(exponent + tl.minimum((s - row_cut[:, None]) * 1e4, 0.0))
                if WRITE_KEEP:
                    kept = (s >= row_cut[:, None]).to(tl.int8)
            seen += tie_count
        else:
            p = tl.exp2(exponent + tl.minimum((s - threshold[:, None]) * 1e4, 0.0))
            if WRITE_KEEP:
                kept = (s >= threshold[:, None]).to(tl.int8)
    else:
        # floor measurement: every valid key (a dense softmax with a known maximum)
        p = tl.exp2(exponent + tl.minimum((s + D + 3.0) * 1e4, 0.0))
        if WRITE_KEEP:
            kept = (s > -D - 4.0).to(tl.int8)
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
    if WRITE_KEEP:
        at = keep_rows[:, None] + offs_n[None, :]
        tl.store(at, kept, mask=row_ok[:, None] & (offs_n < n_keys)[None, :])
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
    q_len,
    n_keys,
    causal_off,
    group,
    num_heads,
    alpha_log2,
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
            threshold, quota, shift, any_partial, upper, alpha_log2, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_mi, stride_mn, D, DV, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, SELECT, DOT_FP32, DOT_PRECISION,
            WRITE_KEEP,
            False,
        )  # fmt: skip
    for start in range(full_end, kv_end, BLOCK_N):
        acc, denominator, seen = _attend_tile(
            acc, denominator, seen, q_op, k_base, v_base, m_base, keep_rows, start, offs_m, row_ok, limit, n_keys,
            threshold, quota, shift, any_partial, upper, alpha_log2, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_mi, stride_mn, D, DV, BLOCK_N, CAUSAL, HAS_MASK, MASK_ROWS, MODE, SELECT, DOT_FP32, DOT_PRECISION,
            WRITE_KEEP,
            True,
        )  # fmt: skip

    # a row that keeps nothing (no valid key, N = 0) has a zero denominator: zeros, never NaN
    out = tl.where(denominator[:, None] > 0, acc / tl.maximum(denominator, 1e-30)[:, None], 0.0)
    out_at = out_ptr + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_oi
    tl.store(out_at + tl.arange(0, DV)[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillConfig:
    """Launch settings of the two kernels (one config per call; `default_prefill_config` picks them)."""

    block_m: int = 128
    block_n: int = 64
    threshold_warps: int = 4
    threshold_stages: int = 3
    attend_block_m: int = 128
    attend_block_n: int = 64
    attend_warps: int = 8
    attend_stages: int = 3
    sample_tiles: int = 8
    score_mode: str = "dot16"  # threshold kernel: dot16 | dot8 | popcount
    attend_mode: str = "dot16"  # attend kernel: dot16 | dot8


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def default_prefill_config(
    head_dim: int,
    value_dim: int,
    num_keys: int,
    interpreting: bool = False,
    value_dtype: torch.dtype = torch.bfloat16,
    row_mask: bool = False,
) -> PrefillConfig:
    """Launch settings from the shape, chosen so that no kernel spills registers on sm_90 (ptxas of Triton 3.9):
    tiles of 128 query rows x 64 keys and 8 warps for both kernels; 32-key tiles for the threshold kernel at d = 128 or
    with a per-row mask, and for the attend kernel with 256-wide or fp32 values (64 rows there). The sample covers
    n / 16 keys, 256 to 1024. Under the interpreter (tests): small tiles, so that small problems span several tiles
    and rounds, and samples of 2 tiles."""
    if interpreting:
        return PrefillConfig(
            block_m=32, block_n=16, attend_block_m=32, attend_block_n=16, sample_tiles=2, threshold_warps=1,
            attend_warps=1, threshold_stages=1, attend_stages=1,
        )  # fmt: skip
    block_n = 32 if head_dim >= 128 or row_mask else 64
    wide_values = value_dim > 128 or (value_dtype == torch.float32 and value_dim >= 128)
    sample_keys = min(1024, max(256, 1 << max(0, (num_keys // 16).bit_length() - 1)))
    return PrefillConfig(
        block_m=128,
        block_n=block_n,
        threshold_warps=8,
        threshold_stages=3,
        attend_block_m=64 if wide_values or value_dtype == torch.float32 else 128,
        attend_block_n=32 if wide_values else 64,
        attend_warps=8,
        attend_stages=3,
        sample_tiles=max(1, sample_keys // block_n),
    )


def _key_dim(key: torch.Tensor) -> int:
    return key.shape[-1] if key.is_floating_point() else as_int32_words(key).shape[-1] * WORD_BITS


def supports_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `hamming_topk_prefill` serves these tensors: (B, H, t, d) layouts, head dims 32, 64 or 128 (float keys
    or their packed int32/int64 sign words), value dims a power of two 16..256, fp16/bf16/fp32 values, a floating
    query, Hq a multiple of Hkv, and batch / key counts that agree."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    if not query.is_floating_point() or value.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not key.is_floating_point() and key.dtype not in (torch.int32, torch.int64):
        return False
    dim = query.shape[-1]
    if dim not in (32, 64, 128) or _key_dim(key) != dim:
        return False
    if not (_is_power_of_two(value.shape[-1]) and 16 <= value.shape[-1] <= 256):
        return False
    batch, num_heads = query.shape[:2]
    num_kv_heads, n_keys = key.shape[1], key.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        return False
    return key.shape[0] == batch and tuple(value.shape[:3]) == (batch, num_kv_heads, n_keys)


@dataclass
class PreparedPrefill:
    """What both kernels read: the ±1 keys in the dtype of each kernel's dot, the mask and num_kept as strided views,
    and the shape bookkeeping. Built once per call (`prepare_prefill`); the benchmark reuses it to time each pass."""

    query: torch.Tensor
    query_words: torch.Tensor | None
    threshold_keys: torch.Tensor
    attend_keys: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    num_kept: torch.Tensor
    is_causal: bool
    alpha: float
    config: PrefillConfig

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        batch, num_heads, query_len, dim = self.query.shape
        return batch, num_heads, self.value.shape[1], query_len, self.value.shape[2], dim


def _unit_keys(key: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, Hkv, n, d) ±1 keys in `dtype` (fp16 or int8) from float keys or packed sign words."""
    if not key.is_floating_point():
        return unpack_sign_bits(key, dim, dtype=dtype)
    return (key >= 0).to(dtype).mul_(2).sub_(1)


def _sign_words(x: torch.Tensor) -> torch.Tensor:
    """Packed sign words, int64 (64 dimensions each) from d = 64 on, int32 for d = 32."""
    if x.is_floating_point():
        if x.is_cuda and not _interpreting():
            from .triton_decode import triton_pack_sign_bits

            words = triton_pack_sign_bits(x)
        else:
            words = pack_sign_bits(x)
    else:
        words = as_int32_words(x).contiguous()
    return words.view(torch.int64) if words.shape[-1] >= 2 else words


def prepare_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid_mask: torch.Tensor | None,
    is_causal: bool,
    num_kept: torch.Tensor | int,
    alpha: float,
    config: PrefillConfig | None = None,
) -> PreparedPrefill:
    """Checks the arguments of `hamming_topk_prefill` and converts the keys' signs for the kernels' dots."""
    if not supports_prefill(query, key, value):
        raise ValueError(
            "The prefill kernel needs (B, H, t, d) tensors with d in (32, 64, 128), power-of-two value dims 16..256, "
            f"fp16/bf16/fp32 values and Hq a multiple of Hkv; got query {tuple(query.shape)} {query.dtype}, key "
            f"{tuple(key.shape)} {key.dtype}, value {tuple(value.shape)} {value.dtype}."
        )
    if valid_mask is not None and valid_mask.dtype != torch.bool:
        raise TypeError(f"valid_mask must be bool (True = may attend), got {valid_mask.dtype}.")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}.")
    batch, num_heads, query_len, dim = query.shape
    n_keys = value.shape[2]
    if config is None:
        row_mask = valid_mask is not None and valid_mask.dim() >= 2 and valid_mask.shape[-2] > 1
        config = default_prefill_config(
            dim, value.shape[-1], n_keys, _interpreting() or not query.is_cuda, value.dtype, row_mask
        )
    for name in ("block_m", "block_n", "attend_block_m", "attend_block_n", "sample_tiles"):
        size = getattr(config, name)
        if not _is_power_of_two(size) or (name != "sample_tiles" and size < 16):
            raise ValueError(f"{name} must be a power of two (>= 16 for blocks), got {size}.")
    if config.score_mode not in SCORE_MODES or config.attend_mode not in ("dot16", "dot8"):
        raise ValueError(f"Unknown score modes {config.score_mode!r} / {config.attend_mode!r}.")
    # the kernels' loads are vectorized only along a dimension of stride 1 (Triton specializes strides equal to 1)
    if query.stride(-1) != 1:
        query = query.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    dtypes = {"dot16": torch.float16, "dot8": torch.int8}
    attend_keys = _unit_keys(key, dim, dtypes[config.attend_mode])
    query_words = None
    if config.score_mode == "popcount":
        threshold_keys = _sign_words(key)
        query_words = _sign_words(query)
    elif config.score_mode == config.attend_mode:
        threshold_keys = attend_keys
    else:
        threshold_keys = _unit_keys(key, dim, dtypes[config.score_mode])
    if not isinstance(num_kept, torch.Tensor):
        num_kept = torch.tensor(int(num_kept), dtype=torch.int32, device=query.device)
    num_kept = num_kept.to(device=query.device, dtype=torch.int32)
    while num_kept.dim() < 3:
        num_kept = num_kept.unsqueeze(0)
    num_kept = num_kept.expand(batch, num_heads, query_len)
    mask = None
    if valid_mask is not None:
        mask = valid_mask.expand(batch, num_heads, query_len, n_keys).view(torch.uint8)
    return PreparedPrefill(
        query, query_words, threshold_keys, attend_keys, value, mask, num_kept, is_causal, float(alpha), config
    )


def _mask_args(prep: PreparedPrefill) -> tuple:
    if prep.mask is None:
        return prep.num_kept, (0, 0, 0, 0), False, False
    strides = prep.mask.stride()
    return prep.mask, strides, True, strides[2] != 0


def prefill_threshold_pass(prep: PreparedPrefill, count: bool = True) -> torch.Tensor:
    """Pass 1 alone: the (B * Hq * q, 4) int32 stats of every row (threshold score, tie quota, largest valid score,
    ties-need-ranking flag). `count=False` times the scores alone (a floor; the stats are then meaningless)."""
    batch, num_heads, num_kv_heads, query_len, n_keys, dim = prep.shape
    config = prep.config
    stats = torch.empty(batch * num_heads * query_len, 4, dtype=torch.int32, device=prep.query.device)
    if stats.numel() == 0:
        return stats
    mask_arg, mask_strides, has_mask, mask_rows = _mask_args(prep)
    mode = SCORE_MODES[config.score_mode]
    if mode == 2:
        q_arg, k_arg = prep.query_words, prep.threshold_keys
        words = k_arg.shape[-1]
    else:
        q_arg, k_arg = prep.query, prep.threshold_keys
        words = 1
    grid = (triton.cdiv(query_len, config.block_m), batch * num_heads)
    options = {} if _interpreting() else {"num_warps": config.threshold_warps, "num_stages": config.threshold_stages}
    with _on_device(prep.query.device):
        _threshold_kernel[grid](
            q_arg,
            k_arg,
            mask_arg,
            prep.num_kept,
            stats,
            query_len,
            n_keys,
            n_keys - query_len,
            num_heads // num_kv_heads,
            num_heads,
            *q_arg.stride(),
            *k_arg.stride(),
            *mask_strides,
            *prep.num_kept.stride(),
            D=dim,
            W=words,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            CAUSAL=prep.is_causal,
            HAS_MASK=has_mask,
            MASK_ROWS=mask_rows,
            MODE=mode,
            USE_POPC=prep.query.is_cuda and not _interpreting(),
            SAMPLE_TILES=config.sample_tiles,
            COUNT=count,
            MAX_ROUNDS=MAX_ROUNDS,
            **options,
        )
    return stats


def prefill_attend_pass(
    prep: PreparedPrefill, stats: torch.Tensor, return_keep: bool = False, select: bool = True
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pass 2 alone, from the stats of pass 1: (B, Hq, q, dv) outputs (and the kept mask if `return_keep`).
    `select=False` keeps every valid key (a dense-softmax floor of this pass)."""
    batch, num_heads, num_kv_heads, query_len, n_keys, dim = prep.shape
    config = prep.config
    value = prep.value
    value_dim = value.shape[-1]
    out = torch.empty(batch, num_heads, query_len, value_dim, dtype=value.dtype, device=value.device)
    keep = None
    if return_keep:
        keep = torch.zeros(batch * num_heads * query_len, n_keys, dtype=torch.int8, device=value.device)
    if out.numel() == 0 or n_keys == 0:
        out.zero_()
    else:
        mask_arg, mask_strides, has_mask, mask_rows = _mask_args(prep)
        grid = (triton.cdiv(query_len, config.attend_block_m), batch * num_heads)
        options = {} if _interpreting() else {"num_warps": config.attend_warps, "num_stages": config.attend_stages}
        with _on_device(value.device):
            _attend_kernel[grid](
                prep.query,
                prep.attend_keys,
                value,
                mask_arg,
                stats,
                out,
                keep if keep is not None else stats,
                query_len,
                n_keys,
                n_keys - query_len,
                num_heads // num_kv_heads,
                num_heads,
                prep.alpha * math.log2(math.e),
                *prep.query.stride(),
                *prep.attend_keys.stride(),
                *value.stride(),
                *mask_strides,
                *out.stride(),
                D=dim,
                DV=value_dim,
                BLOCK_M=config.attend_block_m,
                BLOCK_N=config.attend_block_n,
                CAUSAL=prep.is_causal,
                HAS_MASK=has_mask,
                MASK_ROWS=mask_rows,
                MODE=SCORE_MODES[config.attend_mode],
                SELECT=select,
                # fp32 values: an fp32 product (tl.dot of fp32 would round to tf32); the interpreter's 16-bit dots
                # are done in fp32 too
                DOT_FP32=value.dtype == torch.float32 or _interpreting(),
                # fp32 values on the GPU: three tf32 products (about fp32's precision, on tensor cores)
                DOT_PRECISION="ieee" if _interpreting() else "tf32x3",
                WRITE_KEEP=return_keep,
                **options,
            )
    if return_keep:
        return out, keep.view(batch, num_heads, query_len, n_keys).bool()
    return out


def hamming_topk_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid_mask: torch.Tensor | None,
    is_causal: bool,
    num_kept: torch.Tensor | int,
    alpha: float,
    return_keep: bool = False,
    *,
    config: PrefillConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HAD attention of the binary stage for many query positions (prefill, encoders), exact top-N, in Triton.

    Args:
        query (`torch.Tensor`): (B, Hq, q, d) fp16/bf16/fp32 queries; only their signs are used. d in (32, 64, 128).
        key (`torch.Tensor`): (B, Hkv, n, d) floating keys (signs used), or their packed sign words (B, Hkv, n,
            d // 32) int32 as `packing.pack_sign_bits` makes them (or int64 words of 64 dimensions).
        value (`torch.Tensor`): (B, Hkv, n, dv) fp16/bf16/fp32 values; Hq a multiple of Hkv (query head h reads kv
            head h // (Hq // Hkv)).
        valid_mask (`torch.Tensor`, *optional*): bool, broadcastable to (B, Hq, q, n); True = may attend.
        is_causal (`bool`): also mask the future: query i (of the last q positions) attends keys j <= i + n - q.
        num_kept (`torch.Tensor` or `int`): int32 broadcastable to (B, Hq, q), the N of each row, already clamped by
            the caller to at most the row's number of valid keys (0: the row outputs zeros).
        alpha (`float`): > 0, the softmax temperature of the kept binary scores.
        return_keep (`bool`, *optional*, defaults to `False`): also return the bool (B, Hq, q, n) kept mask (tests
            only: allocates q x n bytes).
        config (`PrefillConfig`, *optional*): launch settings; `default_prefill_config` by default.

    Returns:
        `torch.Tensor`: (B, Hq, q, dv) in the dtype of `value` (and the kept mask if `return_keep`).
    """
    prep = prepare_prefill(query, key, value, valid_mask, is_causal, num_kept, alpha, config)
    if value.shape[2] == 0 or query.shape[2] == 0:  # no keys: every row outputs zeros
        return prefill_attend_pass(prep, None, return_keep=return_keep)
    stats = prefill_threshold_pass(prep)
    return prefill_attend_pass(prep, stats, return_keep=return_keep)
