"""Decode kernel 2 of 3: the fine count of the distances in each row's coarse bin, the threshold distance and the
tie quota of every split (handed out in index order)."""

from __future__ import annotations

import triton
import triton.language as tl

from .decode_split_k import (
    NIBBLE_TILES,
    _add_fine,
    _fine_fields,
    _last_split,
    _load_split_tile,
    _padded_end,
    _program_rows,
    _split_tile,
    _threshold_step,
)


@triton.jit(do_not_specialize=("n_keys",))
def _fine_count_kernel(
    code_ptr,
    fine_ptr,
    stats_ptr,
    quota_ptr,
    ticket_ptr,
    n_keys,
    code_stride,
    rows_per_group,
    split_len,
    num_splits,
    FINE: tl.constexpr,
    R_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INVALID_CODE: tl.constexpr,
    S_BLOCK: tl.constexpr,
):
    row, row_ok, grow = _program_rows(rows_per_group, R_BLOCK)
    coarse_bin = tl.load(stats_ptr + grow * 8, mask=row_ok, other=0)
    low = coarse_bin * FINE  # the FINE distances of the coarse bin: low .. low + FINE - 1

    # the split with its padding: codes past n_keys are INVALID_CODE (whole tiles constant over 16 keys: vectorized)
    start = tl.program_id(2) * split_len
    end = _padded_end(split_len, code_stride)
    # 4-bit counters of the FINE distances, 8 per int32 word (up to 4 words, d = 256), one tensor per word: every
    # tensor of the loop is (R, BLOCK_N) in one layout (no data moved between threads per iteration); their fields are
    # added into the (R, FINE) totals every NIBBLE_TILES blocks
    counts = tl.zeros((R_BLOCK, FINE), dtype=tl.int32)
    code_rows = code_ptr + grow[:, None] * code_stride
    for chunk_start in range(start, end, NIBBLE_TILES * BLOCK_N):
        fine0 = tl.zeros((R_BLOCK, BLOCK_N), dtype=tl.int32)
        fine1 = fine0
        fine2 = fine0
        fine3 = fine0
        for block_start in range(chunk_start, tl.minimum(chunk_start + NIBBLE_TILES * BLOCK_N, end), BLOCK_N):
            offs_n = block_start + tl.arange(0, BLOCK_N)[None, :]
            # masked loads give INVALID_CODE, as the padding holds: never in the bin
            code = tl.load(code_rows + offs_n, mask=row_ok[:, None] & (offs_n < end), other=INVALID_CODE)
            code = code.to(tl.int32)
            fine0, fine1, fine2, fine3 = _add_fine(fine0, fine1, fine2, fine3, code, low[:, None], FINE)
        counts += _fine_fields(fine0, fine1, fine2, fine3, R_BLOCK, FINE)
    cols = tl.arange(0, FINE)
    fine_rows = fine_ptr + (grow * num_splits + tl.program_id(2)) * FINE
    tl.store(fine_rows[:, None] + cols[None, :], counts, mask=row_ok[:, None])

    if _last_split(ticket_ptr, num_splits):
        # the splits' fine histograms, a tile of S_BLOCK splits per load (one tile ahead), summed over the splits once,
        # after the loop
        tile = tl.zeros((R_BLOCK, S_BLOCK, FINE), dtype=tl.int32)
        next_counts, next_at, next_ok = _load_split_tile(fine_ptr, grow, row_ok, 0, num_splits, FINE, S_BLOCK)
        for first in range(0, num_splits, S_BLOCK):
            split_counts = next_counts
            next_counts, next_at, next_ok = _load_split_tile(
                fine_ptr, grow, row_ok, first + S_BLOCK, num_splits, FINE, S_BLOCK
            )
            tile += split_counts
        total = tl.sum(tile, axis=1)
        below = tl.load(stats_ptr + grow * 8 + 1, mask=row_ok, other=0)
        num_kept = tl.load(stats_ptr + grow * 8 + 3, mask=row_ok, other=0)
        # threshold t: the smallest h with count(dist <= h) >= N (t = 0 and a zero quota when N = 0)
        step, quota, _ = _threshold_step(total, num_kept - below, FINE)
        tl.store(stats_ptr + grow * 8 + 4, low + step, mask=row_ok)
        # the ties to keep go to the splits in index order: a split's share is what the quota leaves after the ties
        # of the splits before it (an exclusive prefix sum over the tile, plus the ties of the tiles before it)
        carried = tl.zeros((R_BLOCK,), dtype=tl.int32)
        next_at, next_ok = _split_tile(grow, row_ok, 0, num_splits, S_BLOCK)
        next_ties = tl.load(fine_ptr + next_at * FINE + step[:, None], mask=next_ok, other=0)
        for first in range(0, num_splits, S_BLOCK):
            ties, at, ok = next_ties, next_at, next_ok
            next_at, next_ok = _split_tile(grow, row_ok, first + S_BLOCK, num_splits, S_BLOCK)
            next_ties = tl.load(fine_ptr + next_at * FINE + step[:, None], mask=next_ok, other=0)
            before = carried[:, None] + tl.cumsum(ties, axis=1) - ties
            share = tl.minimum(tl.maximum(quota[:, None] - before, 0), ties)
            tl.store(quota_ptr + at * 2, share, mask=ok)
            tl.store(quota_ptr + at * 2 + 1, ties, mask=ok)
            carried += tl.sum(ties, axis=1)
