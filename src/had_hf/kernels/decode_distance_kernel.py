"""Decode kernel 1 of 3: Hamming distances of a split's keys, stored as one code per (row, key), and the coarse
histogram whose last program finds each row's coarse bin of the N-th smallest distance."""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_split_k import (
    _PER_STEP,
    _add_coarse,
    _batch_and_kv_head,
    _coarse_bin,
    _hamming,
    _kept_count,
    _key_words,
    _last_split,
    _load_split_tile,
    _padded_end,
    _place_fields,
    _program_rows,
    _query_word,
    _split_keys,
)


@triton.jit
def _distance_step(
    coarse, smallest, q0, q1, q2, q3, k0, k1, k2, k3, m_rows, code_at, offs_n, row_ok, key_ok, store_ok, stride_mn,
    D: tl.constexpr, W: tl.constexpr, HAS_MASK: tl.constexpr, USE_POPC: tl.constexpr, INVALID_CODE: tl.constexpr,
):  # fmt: skip
    """One (R, BLOCK_N) tile of the distance kernel, its keys' words k0..k3 loaded (`_key_words`): the keys where
    `key_ok`, codes stored where `store_ok` (masked and absent keys get INVALID_CODE), and the lanes' coarse counters
    and smallest distances updated."""
    dist = _hamming(q0, q1, q2, q3, k0, k1, k2, k3, W, USE_POPC)
    valid = row_ok[:, None] & key_ok
    if HAS_MASK:
        valid = valid & (tl.load(m_rows + offs_n * stride_mn, mask=valid, other=0) != 0)
    code = tl.where(valid, dist, INVALID_CODE)
    tl.store(code_at + offs_n, code.to(code_at.dtype.element_ty), mask=row_ok[:, None] & store_ok)
    return _add_coarse(coarse, dist, valid, D), tl.minimum(smallest, code)


@triton.jit(do_not_specialize=_PER_STEP)
def _distance_kernel(
    q_ptr,
    k_ptr,
    mask_ptr,
    code_ptr,
    coarse_ptr,
    stats_ptr,
    ticket_ptr,
    n_keys,
    code_stride,
    top_n,
    top_n_ratio_bits,
    rows_per_group,
    query_len,
    group,
    num_kv_heads,
    split_len,
    num_splits,
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
    D: tl.constexpr,
    W: tl.constexpr,
    WORD_BITS: tl.constexpr,
    R_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    USE_POPC: tl.constexpr,
    INVALID_CODE: tl.constexpr,
    S_BLOCK: tl.constexpr,
    RATIO: tl.constexpr,
):
    b, hk = _batch_and_kv_head(num_kv_heads)
    row, row_ok, grow = _program_rows(rows_per_group, R_BLOCK)
    head = hk * group + row // query_len
    qi = row % query_len

    # the rows' query sign words, one (R, 1) tensor per word (W <= 4: int64 words from d = 64 on): every tensor of the
    # loop below is (R, BLOCK_N) in one layout, with a key word loaded per (1, BLOCK_N) tile. A (BLOCK_N, W) tile of
    # whole keys reduced over W would make Triton move data between layouts through shared memory (barriers) at
    # every iteration.
    q_base = b * stride_qb + head * stride_qh + qi * stride_qi
    q0 = _query_word(q_ptr, q_base, row_ok, 0, stride_qd, WORD_BITS)
    q1 = q0
    q2 = q0
    q3 = q0
    if W > 1:
        q1 = _query_word(q_ptr, q_base, row_ok, 1, stride_qd, WORD_BITS)
    if W > 2:
        q2 = _query_word(q_ptr, q_base, row_ok, 2, stride_qd, WORD_BITS)
        q3 = _query_word(q_ptr, q_base, row_ok, 3, stride_qd, WORD_BITS)
    m_rows = mask_ptr + (b * stride_mb + head * stride_mh + qi * stride_mi)[:, None]
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    code_at = code_ptr + grow[:, None] * code_stride
    start, end = _split_keys(n_keys, split_len)
    # Tile masks that Triton knows to be constant over 16 keys let it vectorize the loads and the code stores: the
    # loop runs to the last multiple of 16 below `end`, and masked tiles after it (at most 64 keys) cover the rest of
    # the split with the codes' row padding (INVALID_CODE up to code_stride, a multiple of 64), so that the two later
    # kernels read whole, aligned splits.
    end16 = (end // 16) * 16
    end_pad = _padded_end(split_len, code_stride)
    # per lane: 9 coarse bins of width D/8 (bin 8 holds distance D alone) as packed counters, and the smallest
    # valid distance
    coarse = tl.zeros((R_BLOCK, BLOCK_N), dtype=tl.int64)
    smallest = tl.full((R_BLOCK, BLOCK_N), D + 1, dtype=tl.int32)
    # the keys' words a tile ahead: a split spans only a few tiles, so without the prefetch every iteration would
    # wait for its own loads
    offs_next = start + tl.arange(0, BLOCK_N)[None, :]
    n0, n1, n2, n3 = _key_words(k_base, offs_next, offs_next < end16, stride_kn, stride_kw, W)
    for block_start in range(start, end16, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N)[None, :]
        tile_ok = offs_n < end16
        k0, k1, k2, k3 = n0, n1, n2, n3
        offs_next = offs_n + BLOCK_N
        n0, n1, n2, n3 = _key_words(k_base, offs_next, offs_next < end16, stride_kn, stride_kw, W)
        coarse, smallest = _distance_step(
            coarse, smallest, q0, q1, q2, q3, k0, k1, k2, k3, m_rows, code_at, offs_n, row_ok, tile_ok, tile_ok,
            stride_mn, D, W, HAS_MASK, USE_POPC, INVALID_CODE,
        )  # fmt: skip
    for tail_start in range(end16, end_pad, BLOCK_N):
        offs_n = tail_start + tl.arange(0, BLOCK_N)[None, :]
        key_ok = offs_n < end
        k0, k1, k2, k3 = _key_words(k_base, offs_n, key_ok, stride_kn, stride_kw, W)
        coarse, smallest = _distance_step(
            coarse, smallest, q0, q1, q2, q3, k0, k1, k2, k3, m_rows, code_at, offs_n, row_ok, key_ok,
            offs_n < end_pad, stride_mn, D, W, HAS_MASK, USE_POPC, INVALID_CODE,
        )  # fmt: skip

    bins = tl.arange(0, 16)
    counts = _place_fields(tl.zeros((R_BLOCK, 16), dtype=tl.int32), coarse, 0, 9, 7)
    counts = tl.where(bins[None, :] == 15, tl.min(smallest, axis=1)[:, None], counts)  # slot 15: smallest distance
    coarse_rows = coarse_ptr + (grow * num_splits + tl.program_id(2)) * 16
    tl.store(coarse_rows[:, None] + bins[None, :], counts, mask=row_ok[:, None])

    if _last_split(ticket_ptr, num_splits):
        # the splits' histograms, a tile of S_BLOCK splits per load (the next tile's loads issued before the current
        # one is added), accumulated in one (R, S_BLOCK, 16) tile: slots 0..8 summed, slot 15 (the smallest distance)
        # minimized; reduced over the splits once, after the loop
        is_min = (bins == 15)[None, None, :]
        neutral = tl.where(is_min, D + 1, 0)
        tile = tl.zeros((R_BLOCK, S_BLOCK, 16), dtype=tl.int32) + neutral
        next_counts, next_at, next_ok = _load_split_tile(coarse_ptr, grow, row_ok, 0, num_splits, 16, S_BLOCK)
        for first in range(0, num_splits, S_BLOCK):
            split_counts = tl.where(next_ok[:, :, None], next_counts, neutral)
            next_counts, next_at, next_ok = _load_split_tile(
                coarse_ptr, grow, row_ok, first + S_BLOCK, num_splits, 16, S_BLOCK
            )
            tile = tl.where(is_min, tl.minimum(tile, split_counts), tile + split_counts)
        total = tl.where(bins[None, :] < 9, tl.sum(tile, axis=1), 0)
        smallest_row = tl.min(tl.where(bins[None, :] == 15, tl.min(tile, axis=1), D + 1), axis=1)
        # N of each row from its count of valid keys (the splits' histograms' total)
        num_kept = _kept_count(tl.sum(total, axis=1), top_n, top_n_ratio_bits, RATIO)
        coarse_bin, below = _coarse_bin(total, num_kept)
        tl.store(stats_ptr + grow * 8, coarse_bin, mask=row_ok)
        tl.store(stats_ptr + grow * 8 + 1, below, mask=row_ok)
        tl.store(stats_ptr + grow * 8 + 2, tl.minimum(smallest_row, D), mask=row_ok)
        tl.store(stats_ptr + grow * 8 + 3, num_kept, mask=row_ok)
