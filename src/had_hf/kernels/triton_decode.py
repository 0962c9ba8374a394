"""Triton kernels for HAD decode: sign packing, and exact top-N Hamming attention over packed keys.

Decode attention is memory-bound: a step must read every key and the values it keeps. HAD needs only the sign bits
of the keys (d/8 bytes instead of 2d) and N of the n value rows, so it can move ~10x fewer bytes than dense
attention. The catch is the top-N: a sort costs more than the whole byte budget. Binary scores take only d+1 values
(Sb = d - 2h with h the Hamming distance), so the exact top-N is a histogram, a threshold and a tie count.

One long row must fill the GPU, so the keys are split across programs (split-K), and the tie rule of METHOD.md
(exactly N kept, the lower index first among equal scores) needs the splits to agree. Three launches, each program
one (batch, kv head, row block, split); in each, the last program of a row block to finish (an atomic ticket)
reduces what the splits wrote, a tile of splits per load (one tile ahead, summed over the splits after the loop):

1. `_distance_kernel`: Hamming distances of the group's query rows to the split's keys, stored as one byte per
   (row, key) ("codes"; masked keys get an invalid code), and a coarse histogram: 9 bins of width d/8. The last
   program finds each row's coarse bin holding the N-th smallest distance.
2. `_fine_count_kernel`: re-reads the codes (1 byte per key instead of d/8) and counts the d/8 distances of that
   coarse bin. The last program finds the threshold distance t (the smallest h with count(dist <= h) >= N) and
   hands the tie quota N - count(dist < t) out to the splits in index order (a prefix sum of their tie counts).
3. `_attend_kernel`, in two phases. Select: keep dist < t and the split's share of the ties (the first ones in
   index order), and compact the keys kept by any of the program's rows into a list with their weights
   exp(alpha * (Sb - Sb_max)); the row's largest kept score is known in advance, so the splits' partial softmaxes
   share one shift and need no rescaling. Gather: load the listed value rows, every load useful (masked loads over
   all keys would fetch only ~N/n of each tile: too few bytes in flight to hide the memory latency), accumulate
   their weighted sum; the next tile's rows are in flight while a tile is accumulated. The last program sums the
   splits' partial numerators and denominators into the output.

The histograms are counted in registers: each lane adds 1 << (7 * bin) to an int64 of packed 7-bit counters (at most
127 iterations per program), so that no cross-thread work happens per key; `tl.histogram` counts one histogram per
block (not per row) with a warp ballot per bit of the bin index and shared-memory atomics, which made the first
version compute-bound. The loops of the first two kernels keep every
tensor (R, BLOCK_N) in one layout (a key word per load, one int64 counter tensor per word): a tile of whole keys
reduced over its words, or a third axis of counters, made Triton move data between threads through shared memory
at every iteration (6 and 4 barriers per iteration; now 0 and 0, sm_90 SASS).

Vectorized memory access needs masks that Triton can see are constant over 16 keys. A mask `offs < end` with an
arbitrary `end` kept every load at one byte (codes) or one word (keys). So the codes' rows are padded with the
invalid code up to their stride (a multiple of 64), the last two kernels run over whole, aligned splits, and the
distance kernel's loop stops at a multiple of 16 and finishes with masked tiles. From d = 64 on the keys are read
as int64 words: one 8-byte load per key at d = 64, contiguous over the keys. Together: distance loop -46% and fine
count -37% instructions, loads 128- and 64-bit wide. The distance loop loads the next tile's key words one iteration
ahead (4-7% less distance time on an H200; the same prefetch of codes in the fine count gained nothing).

The one-row selection works on (BLOCK_N / 8, 8) tiles, each thread's 8 keys contiguous: its prefix sums are a sum
and a scan inside each thread plus one block-wide scan of a value per thread. A (1, BLOCK_N) tile scans 8 strided
values per thread, each across the whole block (shuffles, shared memory, barriers): 555 -> 279 instructions per
1,024 keys. A 3-D (R, BLOCK_N / 8, 8) tile for several rows was tried. Triton spread its rows over threads, so the
union over the rows crossed threads (4x the instructions). Multi-row programs keep the (R, BLOCK_N) scan.

Grouped-query attention: the g query heads of a kv head (times the query positions) are the rows of one program, so
the keys are read once per group, and a value row kept by any of them is loaded once.

The kernels run on CUDA and, for tests, on the CPU through Triton's interpreter (`TRITON_INTERPRET=1` before
`triton` is imported); the interpreter lacks libdevice's `popc`, so popcount is then done with bit arithmetic.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .packing import WORD_BITS, as_int32_words

__all__ = ["hamming_topk_decode", "supports_decode_shape", "triton_pack_sign_bits"]


@functools.cache
def _interpreting() -> bool:
    # Triton reads the variable once, when it is imported; so do we (an environment lookup per call costs ~5 us)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _on_device(device: torch.device):
    """The context of a launch on `device`: Triton launches on the current CUDA device and its current stream, so
    tensors on another GPU (a model split over GPUs) need their device made current. A no-op when it already is, and
    on the CPU (the interpreter)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _popcount(x, USE_POPC: tl.constexpr):
    """Set bits of each int32 or int64 word (libdevice on the GPU; SWAR bit arithmetic in the interpreter)."""
    if USE_POPC:
        return libdevice.popc(x)  # __nv_popc, or __nv_popcll for int64 words
    elif x.dtype == tl.int64:
        return _popcount((x & 0xFFFFFFFF).to(tl.int32), False) + _popcount((x >> 32).to(tl.int32), False)
    else:
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        u = (u * 0x01010101) >> 24
        return u.to(tl.int32)


# ----------------------------------------------------------------------------------------------------------------------
# sign packing
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=("num_words",))
def _pack_signs_kernel(
    x_ptr,
    out_ptr,
    num_words,
    size_1,
    size_2,
    stride_0,
    stride_1,
    stride_2,
    stride_d,
    W: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
):
    # one tile row per output word: its 32 dimensions, contiguous in a contiguous input
    words = tl.program_id(0).to(tl.int64) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    word_ok = words < num_words
    vector = words // W
    # vectors are indexed (i0, i1, i2) over up to three leading dims, so strided (B, H, t, d) inputs need no copy
    i2 = vector % size_2
    i1 = (vector // size_2) % size_1
    i0 = vector // (size_2 * size_1)
    base = i0 * stride_0 + i1 * stride_1 + i2 * stride_2 + (words % W) * 32 * stride_d
    offs_b = tl.arange(0, 32)
    x = tl.load(x_ptr + base[:, None] + offs_b[None, :] * stride_d, mask=word_ok[:, None], other=0.0)
    # distinct powers of two: their sum is their OR, and bit 31 lands on the int32 sign as it should
    packed = tl.sum((x >= 0).to(tl.int32) << offs_b[None, :], axis=1)
    tl.store(out_ptr + words, packed, mask=word_ok)


def triton_pack_sign_bits(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of `packing.pack_sign_bits`: (..., d) floats to (..., d // 32) int32 sign words, contiguous."""
    dim = x.shape[-1]
    if dim <= 0 or dim % WORD_BITS or dim & (dim - 1):
        raise ValueError(f"The Triton sign packer needs d a power of two >= 32, got {dim}.")
    words = dim // WORD_BITS
    out_shape = (*x.shape[:-1], words)
    lead = list(x.shape[:-1])
    if len(lead) > 3:
        x = x.reshape(-1, *lead[-2:], dim)
        lead = list(x.shape[:-1])
    sizes = [1] * (3 - len(lead)) + lead
    strides = [0] * (3 - len(lead)) + [x.stride(i) for i in range(len(lead))]
    out = torch.empty(*x.shape[:-1], words, dtype=torch.int32, device=x.device)
    num_words = math.prod(sizes) * words
    if num_words == 0:
        return out.view(out_shape)
    block_words = 64
    grid = (_cdiv(num_words, block_words),)
    with _on_device(x.device):
        _pack_signs_kernel[grid](
            x, out, num_words, sizes[1], sizes[2], *strides, x.stride(-1), W=words, BLOCK_WORDS=block_words
        )
    return out.view(out_shape)  # more than 3 leading dimensions were flattened into the first one


# Packed counters: 7-bit fields in an int64, 8 fields per word (9 for the coarse histogram, 63 bits). A lane adds at
# most one per counting block, so a split may span at most 127 of them.
MAX_ITERATIONS = 127


@triton.jit
def _place_fields(counts, acc, FIRST: tl.constexpr, NUM_FIELDS: tl.constexpr):
    """Writes the totals over the lanes of the first NUM_FIELDS 7-bit fields of (R, X) int64 packed counters into
    columns FIRST .. FIRST + NUM_FIELDS - 1 of the (R, C) int32 `counts` (fields past C are dropped)."""
    cols = tl.arange(0, counts.shape[1])
    for field in tl.static_range(NUM_FIELDS):
        if FIRST + field < counts.shape[1]:
            count = tl.sum(((acc >> (7 * field)) & 127).to(tl.int32), axis=1)
            counts = tl.where(cols[None, :] == FIRST + field, count[:, None], counts)
    return counts


@triton.jit
def _query_word(q_ptr, q_base, row_ok, word, stride_qd, BITS: tl.constexpr):
    """(R, 1) int32 (BITS 32) or int64 (BITS 64): the sign bits of dimensions BITS * word .. BITS * word + BITS - 1 of
    the rows' queries (dimension j on bit j, little-endian: two int32 words viewed as one int64)."""
    offs_b = tl.arange(0, BITS)
    q = tl.load(q_ptr + q_base[:, None] + (word * BITS + offs_b[None, :]) * stride_qd, mask=row_ok[:, None], other=0.0)
    word_type = tl.int64 if BITS == 64 else tl.int32
    return tl.sum((q >= 0).to(word_type) << offs_b[None, :].to(word_type), axis=1)[:, None]


@triton.jit
def _key_words(k_base, offs_n, n_ok, stride_kn, stride_kw, W: tl.constexpr):
    """The (1, BLOCK_N) sign words of the keys at offs_n (W of them; the unused ones repeat word 0)."""
    k_at = k_base + offs_n.to(tl.int64) * stride_kn
    w0 = tl.load(k_at, mask=n_ok, other=0)
    w1 = w0
    w2 = w0
    w3 = w0
    if W > 1:
        w1 = tl.load(k_at + stride_kw, mask=n_ok, other=0)
    if W > 2:
        w2 = tl.load(k_at + 2 * stride_kw, mask=n_ok, other=0)
        w3 = tl.load(k_at + 3 * stride_kw, mask=n_ok, other=0)
    return w0, w1, w2, w3


# Split-K bookkeeping shared by the three kernels: each program is one (batch * kv head, row block, split) of the grid.


@triton.jit
def _program_rows(rows_per_group, R_BLOCK: tl.constexpr):
    """This program's rows: their index in the kv head's group (query head hk*g + row // q, position row % q), whether
    they exist, and their global index (b, hk, row) flattened (int64)."""
    row = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    row_ok = row < rows_per_group
    grow = tl.program_id(0).to(tl.int64) * rows_per_group + row
    return row, row_ok, grow


@triton.jit
def _batch_and_kv_head(num_kv_heads):
    """The batch entry and kv head of this program (int64: they enter addresses)."""
    pid_bh = tl.program_id(0)
    return (pid_bh // num_kv_heads).to(tl.int64), (pid_bh % num_kv_heads).to(tl.int64)


@triton.jit
def _split_keys(n_keys, split_len):
    """The keys [start, end) of this program's split."""
    start = tl.program_id(2) * split_len
    return start, tl.minimum(start + split_len, n_keys)


@triton.jit
def _padded_end(split_len, code_stride):
    """The end of this program's split in the codes' rows, padding included: a multiple of 16 that Triton can see
    (both arguments are specialized as multiples of 16), so that masks built from it let loads be vectorized."""
    return tl.minimum(tl.program_id(2) * split_len + split_len, code_stride)


@triton.jit
def _last_split(ticket_ptr, num_splits):
    """Whether this program is the last split of its row block to finish: it then reduces what all splits wrote.

    The barrier orders every thread's stores before the ticket, whose acq_rel semantics publish them to, and fetch the
    others' for, the last program. Every split has taken its ticket when the last one does: it resets the ticket at
    once, ready for the next call.
    """
    tl.debug_barrier()
    ticket_at = ticket_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    last = tl.atomic_add(ticket_at, 1, sem="acq_rel") == num_splits - 1
    if last:
        tl.atomic_xchg(ticket_at, 0)
    return last


@triton.jit
def _split_tile(grow, row_ok, first, num_splits, S_BLOCK: tl.constexpr):
    """(R, S_BLOCK) indices grow * num_splits + s of the per-(row, split) results of splits first .. first + S_BLOCK - 1,
    and which of them exist: the last program reduces the splits a tile at a time."""
    split = first + tl.arange(0, S_BLOCK)
    at = grow[:, None] * num_splits + split[None, :]
    return at, row_ok[:, None] & (split < num_splits)[None, :]


@triton.jit
def _load_split_tile(ptr, grow, row_ok, first, num_splits, WIDTH: tl.constexpr, S_BLOCK: tl.constexpr):
    """The (R, S_BLOCK, WIDTH) records of WIDTH values per (row, split) of a tile of splits (zeros where the row or the
    split does not exist), and the tile's indices and mask (`_split_tile`)."""
    at, ok = _split_tile(grow, row_ok, first, num_splits, S_BLOCK)
    cols = tl.arange(0, WIDTH)
    records = tl.load(ptr + at[:, :, None] * WIDTH + cols[None, None, :], mask=ok[:, :, None], other=0)
    return records, at, ok


# Integers that change at every decode step and only bound loops: not specialized, so that their divisibility by 16
# changing from one step to the next compiles nothing. Everything that enters an address (the row stride of the codes
# is padded to a multiple of 64 for this) stays specialized: Triton vectorizes loads only when it knows alignment.
_PER_STEP = ("n_keys", "top_n")


@triton.jit
def _distance_step(
    coarse, smallest, q0, q1, q2, q3, k0, k1, k2, k3, m_rows, code_at, offs_n, row_ok, key_ok, store_ok, stride_mn,
    D: tl.constexpr, W: tl.constexpr, HAS_MASK: tl.constexpr, USE_POPC: tl.constexpr, INVALID_CODE: tl.constexpr,
):  # fmt: skip
    """One (R, BLOCK_N) tile of the distance kernel, its keys' words k0..k3 loaded (`_key_words`): the keys where
    `key_ok`, codes stored where `store_ok` (masked and absent keys get INVALID_CODE), and the lanes' coarse counters
    and smallest distances updated."""
    dist = _popcount(q0 ^ k0, USE_POPC)
    if W > 1:
        dist += _popcount(q1 ^ k1, USE_POPC)
    if W > 2:
        dist += _popcount(q2 ^ k2, USE_POPC)
        dist += _popcount(q3 ^ k3, USE_POPC)
    valid = row_ok[:, None] & key_ok
    if HAS_MASK:
        valid = valid & (tl.load(m_rows + offs_n * stride_mn, mask=valid, other=0) != 0)
    code = tl.where(valid, dist, INVALID_CODE)
    tl.store(code_at + offs_n, code.to(code_at.dtype.element_ty), mask=row_ok[:, None] & store_ok)
    one = tl.full(code.shape, 1, dtype=tl.int64)
    coarse += tl.where(valid, one << (7 * (dist // (D // 8))).to(tl.int64), 0)
    return coarse, tl.minimum(smallest, code)


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
    n_keep_ptr,
    stride_nb,
    stride_nh,
    stride_ni,
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
    PER_ROW_N: tl.constexpr,
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
    counts = _place_fields(tl.zeros((R_BLOCK, 16), dtype=tl.int32), coarse, 0, 9)
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
        wanted = top_n
        if PER_ROW_N:  # N of each row given by the caller (the ratio rule counts each row's valid keys)
            wanted = tl.load(n_keep_ptr + b * stride_nb + head * stride_nh + qi * stride_ni, mask=row_ok, other=0)
        num_kept = tl.minimum(tl.sum(total, axis=1), wanted)
        # the coarse bin of the N-th smallest distance (bin 0 and nothing below when N = 0)
        cumulative = tl.cumsum(total, axis=1)
        coarse_bin = tl.min(tl.where(cumulative >= num_kept[:, None], bins[None, :], 16), axis=1)
        below = tl.sum(tl.where(bins[None, :] < coarse_bin[:, None], total, 0), axis=1)
        tl.store(stats_ptr + grow * 8, coarse_bin, mask=row_ok)
        tl.store(stats_ptr + grow * 8 + 1, below, mask=row_ok)
        tl.store(stats_ptr + grow * 8 + 2, tl.minimum(smallest_row, D), mask=row_ok)
        tl.store(stats_ptr + grow * 8 + 3, num_kept, mask=row_ok)


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
    D: tl.constexpr,
    FINE: tl.constexpr,
    R_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    S_BLOCK: tl.constexpr,
):
    row, row_ok, grow = _program_rows(rows_per_group, R_BLOCK)
    coarse_bin = tl.load(stats_ptr + grow * 8, mask=row_ok, other=0)
    low = coarse_bin * FINE  # the FINE distances of the coarse bin: low .. low + FINE - 1

    # the split with its padding: codes past n_keys are INVALID_CODE (whole tiles constant over 16 keys: vectorized)
    start = tl.program_id(2) * split_len
    end = _padded_end(split_len, code_stride)
    # packed counters of the FINE distances, 8 per int64 word (up to 4 words, d = 256), one tensor per word: every
    # tensor of the loop is (R, BLOCK_N) in one layout (no data moved between threads per iteration)
    fine0 = tl.zeros((R_BLOCK, BLOCK_N), dtype=tl.int64)
    fine1 = fine0
    fine2 = fine0
    fine3 = fine0
    one = tl.full((R_BLOCK, BLOCK_N), 1, dtype=tl.int64)
    code_rows = code_ptr + grow[:, None] * code_stride
    for block_start in range(start, end, BLOCK_N):
        offs_n = block_start + tl.arange(0, BLOCK_N)[None, :]
        in_bounds = row_ok[:, None] & (offs_n < end)
        code = tl.load(code_rows + offs_n, mask=in_bounds, other=0).to(tl.int32)
        offset = code - low[:, None]  # masked keys carry INVALID_CODE > d: never in the bin
        in_bin = in_bounds & (offset >= 0) & (offset < FINE)
        field = tl.where(in_bin, one << (7 * (offset & 7)).to(tl.int64), 0)
        fine0 += tl.where(offset < 8, field, 0)
        if FINE > 8:
            fine1 += tl.where((offset >> 3) == 1, field, 0)
        if FINE > 16:
            fine2 += tl.where((offset >> 3) == 2, field, 0)
            fine3 += tl.where((offset >> 3) == 3, field, 0)

    counts = _place_fields(tl.zeros((R_BLOCK, FINE), dtype=tl.int32), fine0, 0, 8)
    if FINE > 8:
        counts = _place_fields(counts, fine1, 8, 8)
    if FINE > 16:
        counts = _place_fields(counts, fine2, 16, 8)
        counts = _place_fields(counts, fine3, 24, 8)
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
        needed = num_kept - below
        cumulative = tl.cumsum(total, axis=1)
        step = tl.min(tl.where(cumulative >= needed[:, None], cols[None, :], FINE - 1), axis=1)
        quota = needed - tl.sum(tl.where(cols[None, :] < step[:, None], total, 0), axis=1)
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
def _row_keep(code, thr, quota, seen_ties, rank_ties):
    """Which keys of one row's (BLOCK_N // 8, 8) tile of codes (each thread's 8 keys contiguous, in index order) are
    kept: distance below the threshold, or at it within the split's quota of ties, the lower index first; and the
    row's running count of ties."""
    tie = code == thr
    if rank_ties:
        tie_count = tie.to(tl.int32)
        thread_ties = tl.sum(tie_count, axis=1)
        before = seen_ties + (tl.cumsum(thread_ties, axis=0) - thread_ties)[:, None]
        keep = (code < thr) | (tie & (before + tl.cumsum(tie_count, axis=1) <= quota))
        seen_ties += tl.sum(thread_ties, axis=0)
    else:
        keep = (code < thr) | (tie & (quota > 0))
    return keep, seen_ties


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
    n_keys,
    code_stride,
    rows_per_group,
    query_len,
    group,
    num_kv_heads,
    split_len,
    num_splits,
    alpha_log2,
    alpha_nonnegative,
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
    quota = tl.load(quota_ptr + (grow * num_splits + pid_s) * 2, mask=row_ok, other=0)
    ties = tl.load(quota_ptr + (grow * num_splits + pid_s) * 2 + 1, mask=row_ok, other=0)
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
        den0 = tl.zeros((BLOCK_N // 8,), dtype=tl.float32)  # per thread: fewer registers
        if R_BLOCK == 1:
            # one row: its codes a tile ahead (several rows: more registers than the prefetch is worth)
            next0 = tl.load(code_row0 + start + keys8, mask=start + keys8 < end0, other=INVALID_CODE)
        if R_BLOCK > 1:
            grow1, code_row1, thr1, quota1, shift1, end1 = _block_row(
                grow, thr, quota, shift, row_ok, r_local, 1, code_ptr, code_stride, end
            )
            seen1 = num_listed
            den1 = den0
        if R_BLOCK > 2:
            grow2, code_row2, thr2, quota2, shift2, end2 = _block_row(
                grow, thr, quota, shift, row_ok, r_local, 2, code_ptr, code_stride, end
            )
            seen2 = num_listed
            den2 = den0
            grow3, code_row3, thr3, quota3, shift3, end3 = _block_row(
                grow, thr, quota, shift, row_ok, r_local, 3, code_ptr, code_stride, end
            )
            seen3 = num_listed
            den3 = den0
        for block_start in range(start, end, BLOCK_N):
            offs_n = block_start + keys8
            # masked keys and absent rows carry INVALID_CODE > d >= thr: never kept
            if R_BLOCK == 1:
                code0 = next0.to(tl.int32)
                next0 = tl.load(code_row0 + offs_n + BLOCK_N, mask=offs_n + BLOCK_N < end0, other=INVALID_CODE)
            else:
                code0 = _row_codes(code_row0, offs_n, end0, INVALID_CODE)
            keep0, seen0 = _row_keep(code0, thr0, quota0, seen0, rank_ties)
            listed = keep0.to(tl.int32)
            if R_BLOCK > 1:
                code1 = _row_codes(code_row1, offs_n, end1, INVALID_CODE)
                keep1, seen1 = _row_keep(code1, thr1, quota1, seen1, rank_ties)
                listed = tl.maximum(listed, keep1.to(tl.int32))
            if R_BLOCK > 2:
                code2 = _row_codes(code_row2, offs_n, end2, INVALID_CODE)
                keep2, seen2 = _row_keep(code2, thr2, quota2, seen2, rank_ties)
                code3 = _row_codes(code_row3, offs_n, end3, INVALID_CODE)
                keep3, seen3 = _row_keep(code3, thr3, quota3, seen3, rank_ties)
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
        select_totals = tl.sum(denominators, axis=1)

    # the list was written by all threads of this program: make it visible to all of them
    tl.debug_barrier()

    # phase 2: gather the listed value rows and accumulate their weighted sum. The list entries of the next
    # iteration are fetched one iteration ahead, so that an iteration waits for its value rows only.
    offs_d = tl.arange(0, DV)
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    slots = tl.arange(0, BLOCK_K)
    # tl.dot needs >= 16 rows: the weight rows past R_BLOCK are zeros (R_DOT is 1 on the multiply-add path)
    weight_rows = tl.arange(0, R_DOT)
    weight_row_ok = (weight_rows < R_BLOCK)[:, None]
    # software pipeline by hand: the list entries two tiles ahead, the value rows one tile ahead, so that the loads
    # of the next tile are in flight while the current one is accumulated
    index = tl.load(list_index + slots, mask=slots < num_listed, other=0)
    if ROW_FMA:
        # one row: the weights come from the listed keys' codes (one byte each, written by the distance kernel)
        # (one row: the selection's code_row0 and shift0)
        codes = tl.load(code_row0 + index, mask=slots < num_listed, other=INVALID_CODE)
        row_denominator = tl.zeros((BLOCK_K,), dtype=tl.float32)
    else:
        weights = _listed_weights(list_weight, slots, num_listed, weight_rows, weight_row_ok, R_BLOCK)
        next_weights = _listed_weights(list_weight, BLOCK_K + slots, num_listed, weight_rows, weight_row_ok, R_BLOCK)
    v = _gather_rows(v_base, index, slots < num_listed, offs_d, stride_vn, stride_vd)
    next_index = tl.load(list_index + BLOCK_K + slots, mask=BLOCK_K + slots < num_listed, other=0)
    if ROW_FMA:
        # multiply-add in registers (no tensor-core layout shuffles), reduced once after the loop
        partial = tl.zeros((BLOCK_K, DV), dtype=tl.float32)
    else:
        partial = tl.zeros((R_DOT, DV), dtype=tl.float32)
    for k0 in range(0, num_listed, BLOCK_K):
        tile_v = v
        following = k0 + BLOCK_K + slots
        v = _gather_rows(v_base, next_index, following < num_listed, offs_d, stride_vn, stride_vd)
        if ROW_FMA:
            tile_codes = codes
            codes = tl.load(code_row0 + next_index, mask=following < num_listed, other=INVALID_CODE)
        else:
            tile_weights = weights
            weights = next_weights
        after = following + BLOCK_K
        next_index = tl.load(list_index + after, mask=after < num_listed, other=0)
        if ROW_FMA:
            # INVALID_CODE marks slots past the list: weight 0
            p = _kept_weights(tile_codes != INVALID_CODE, shift0, tile_codes.to(tl.int32), alpha_log2,
                              v_ptr.dtype.element_ty, V_IS_FP32)  # fmt: skip
            row_denominator += p
            partial += p[:, None] * tile_v.to(tl.float32)
        else:
            next_weights = _listed_weights(list_weight, after, num_listed, weight_rows, weight_row_ok, R_BLOCK)
            if DOT_FP32:
                # fp32 values, or the interpreter, whose tl.dot mishandles 16-bit floats (the weights are rounded)
                partial += tl.dot(tile_weights, tile_v.to(tl.float32), input_precision="ieee")
            else:
                partial += tl.dot(tile_weights.to(tile_v.dtype), tile_v)

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


# Host-side integer helpers: `triton.cdiv` and `triton.next_power_of_2` are constexpr functions in recent Triton,
# whose host calls cost ~10 us each (a dozen per decode call added ~100 us of launch overhead).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _splits(n_keys: int, num_splits: int) -> tuple[int, int]:
    """At most `num_splits` splits of whole 64-key blocks over n keys: their number and length."""
    split_len = _cdiv(_cdiv(n_keys, num_splits), 64) * 64
    return _cdiv(n_keys, split_len), split_len


def _next_power_of_2(x: int) -> int:
    return 1 << (x - 1).bit_length() if x > 1 else 1


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


# The last program of a row block reduces the splits' results a tile of splits at a time, in registers: the tile being
# added, the next one (loaded one iteration ahead) and their running sum hold at most this many values per thread each.
_TILE_VALUES_PER_THREAD = 32


def _split_tile_size(num_splits: int, split_block: int, per_split: int, num_warps: int | None) -> int:
    """Splits per tile of a last-program reduction whose splits wrote `per_split` values each (a power of two)."""
    budget = _TILE_VALUES_PER_THREAD * 32 * (num_warps or 4)  # Triton's default: 4 warps
    fits = max(1, budget // per_split)
    return min(split_block, _next_power_of_2(num_splits), 1 << (fits.bit_length() - 1))


def _as_int64_words(words: torch.Tensor) -> torch.Tensor:
    """(..., W) int32 words as (..., W // 2) int64 words (two dimensions' words per int64, little-endian), a view
    where the layout allows it (a packed key cache's is), a copy otherwise."""
    try:
        return words.view(torch.int64)
    except RuntimeError:  # an odd stride or offset in int32 units
        return words.clone(memory_format=torch.contiguous_format).view(torch.int64)


def supports_decode_shape(head_dim: int, value_dim: int) -> bool:
    """Whether the decode kernel handles these head dimensions (powers of two: 32..256 for keys, 16..256 values)."""
    return (
        _is_power_of_two(head_dim) and 32 <= head_dim <= 256 and _is_power_of_two(value_dim) and 16 <= value_dim <= 256
    )


class _Workspace:
    """Scratch memory of the decode kernels, kept per (device, stream) and grown as needed.

    Allocating a dozen small tensors per call costs more CPU time than a decode step's kernels take on the GPU. The
    tickets of the last-program reductions must start at zero: the kernels reset them after use.
    """

    _instances: dict[tuple, _Workspace] = {}

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}
        self.layouts: dict[tuple, tuple] = {}

    @classmethod
    def get(cls, device: torch.device) -> _Workspace:
        if device.type == "cuda" and (
            torch.cuda.is_current_stream_capturing()
            or torch.cuda.current_stream(device) != torch.cuda.default_stream(device)
        ):
            # CUDA graphs (recorded, and warmed up by torch.compile's CUDA-graph trees) run on a side stream and own
            # their memory: scratch allocated there lives in the graph's pool, and a cached buffer would outlive the
            # recording (CUDA-graph trees refuse untracked live allocations). Off the default stream: no cache.
            return cls(device)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (device.type, device.index, stream)
        if key not in cls._instances:
            cls._instances[key] = cls(device)
        return cls._instances[key]

    def take(self, name: str, numel: int, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            size = max(numel, int(numel * 1.25))
            buffer = (torch.zeros if zero else torch.empty)(size, dtype=dtype, device=self.device)
            self.buffers[name] = buffer
            self.layouts.clear()  # their views hold the old buffers
        return buffer

    def layout(self, key: tuple, build) -> tuple:
        """The views of one call layout, built once: a generation keeps its layout (which changes with the number
        of splits, the split length and the codes' row stride) for many steps, and a dozen slices cost ~40 us."""
        views = self.layouts.get(key)
        if views is None:
            views = self.layouts[key] = build()
        return views


@functools.lru_cache(maxsize=256)
def _launch_plan(distance_splits, num_splits, split_block, r_block, fine, value_dim, num_warps, stages) -> tuple:
    """Per kernel (distance, fine count, attend): the split-tile size of its last-program reduction, and its launch
    options (shared dicts: not to be modified)."""
    s_blocks = tuple(
        _split_tile_size(splits, split_block, r_block * per_split, num_warps)
        for splits, per_split in ((distance_splits, 16), (num_splits, fine), (num_splits, value_dim))
    )
    options = []
    for kernel_stages in stages:
        option = {} if num_warps is None else {"num_warps": num_warps}
        if kernel_stages is not None:
            option["num_stages"] = kernel_stages
        options.append(option)
    return s_blocks, tuple(options)


def hamming_topk_decode(
    query: torch.Tensor,
    key_words: torch.Tensor,
    value: torch.Tensor,
    valid_mask: torch.Tensor | None,
    top_n: int | torch.Tensor,
    alpha: float,
    *,
    num_splits: int | None = None,
    programs_per_sm: int | None = None,
    distance_programs_per_sm: int | None = None,
    distance_splits: int | None = None,
    block_n: int | None = None,
    hist_block_elements: int = 1024,
    num_warps: int | None = None,
    num_stages: int | Sequence[int | None] | None = None,
    split_block: int = 32,
    gather_block: int = 32,
    single_row_dot: bool = False,
    return_keep: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HAD attention of a few query positions against packed keys, in Triton (exact top-N, split over the keys).

    Args:
        query (`torch.Tensor`): (B, Hq, q, d) floating queries (only their signs are used); q small (decode).
        key_words (`torch.Tensor`): (B, Hkv, n, d // 32) int32 (or (B, Hkv, n, d // 64) int64) packed key signs.
        value (`torch.Tensor`): (B, Hkv, n, dv) values; Hq must be a multiple of Hkv.
        valid_mask (`torch.Tensor`, *optional*): bool broadcastable to (B, Hq, q, n), True = may attend.
        top_n (`int` or `torch.Tensor`): N, the number of keys each query keeps: one number, or an int32 tensor
            broadcastable to (B, Hq, q) with each row's N (never more than its valid keys are kept).
        alpha (`float`): softmax temperature of the kept binary scores.
        num_splits (`int`, *optional*): number of key splits per row; by default enough for `programs_per_sm`.
        programs_per_sm (`int`, *optional*): programs per multiprocessor that the default `num_splits` aims at
            (more programs keep more loads in flight; fewer read fewer partial results). Defaults to 8 for programs
            of one query row and 4 for programs of several (their `tl.dot` gather holds about twice the registers:
            4 fit on a multiprocessor; both were the fastest of 4, 8, 12 and 16 on an H200, `decode.json`).
        distance_programs_per_sm (`int`, *optional*): the same for the distance kernel alone, which only needs its
            splits' histograms to add up and can use fewer, longer splits than the two kernels after it (whose
            splits share the tie quotas); at most their split count. `None` (the default), or `num_splits` given:
            the same splits for all three (fewer distance programs did not pay on an H200, `decode.json`).
        distance_splits (`int`, *optional*): the distance kernel's split count itself (at most `num_splits`).
        block_n (`int`, *optional*): keys per iteration of the attend kernel's selection; defaults to 1024 for
            programs of one row and 8192 // rows (at least 64) for programs of several.
        hist_block_elements (`int`, *optional*, defaults to 1024): (rows x keys) per iteration of the distance and
            counting kernels.
        num_warps (`int`, *optional*): warps per program of the kernels (Triton's default if unset).
        num_stages (`int` or three of them, *optional*): software-pipelining stages of the kernels' loops, for all
            three or per kernel (distance, fine count, attend; `None` entries: Triton's default, as when unset).
        split_block (`int`, *optional*, defaults to 32): most splits per tile of the last programs' reductions (a
            power of two); each kernel lowers it to the splits there are and to its register budget.
        gather_block (`int`, *optional*, defaults to 32): kept value rows per iteration of the attend kernel's
            gather (32 was faster than 64 and 128 at every benchmarked shape: fewer registers, more programs).
        single_row_dot (`bool`, *optional*, defaults to `False`): accumulate a program of one query row with
            `tl.dot` (padded to 16 rows) instead of multiply-adds.
        return_keep (`bool`, *optional*, defaults to `False`): also return the bool (B, Hq, q, n) mask of the kept
            keys (for tests; costs one byte per (row, key)).

    Returns:
        `torch.Tensor`: (B, Hq, q, dv) in the dtype of `value` (and the keep mask if `return_keep`).
    """
    key_words = as_int32_words(key_words)
    batch, num_heads, query_len, dim = query.shape
    _, num_kv_heads, n_keys, num_words = key_words.shape
    value_dim = value.shape[-1]
    if dim != num_words * WORD_BITS:
        raise ValueError(f"Queries have dimension {dim} but the keys hold {num_words * WORD_BITS} bits.")
    if not supports_decode_shape(dim, value_dim):
        raise ValueError(
            f"The decode kernel needs power-of-two head dims (32..256, values 16..256), got {dim}, {value_dim}."
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} key/value heads evenly.")
    if tuple(value.shape[:3]) != (batch, num_kv_heads, n_keys) or key_words.shape[0] != batch:
        raise ValueError(
            f"Shapes disagree: query {tuple(query.shape)}, keys {tuple(key_words.shape)}, values {tuple(value.shape)}."
        )
    if valid_mask is not None and valid_mask.dtype != torch.bool:
        raise TypeError(f"valid_mask must be bool (True = may attend), got {valid_mask.dtype}.")
    if not _is_power_of_two(split_block):
        raise ValueError(f"split_block must be a power of two, got {split_block}.")
    if not _is_power_of_two(hist_block_elements):
        raise ValueError(f"hist_block_elements must be a power of two, got {hist_block_elements}.")
    for name, size in (("block_n", block_n), ("gather_block", gather_block)):
        if size is not None and not (_is_power_of_two(size) and size >= 16):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}.")
    stages = tuple(num_stages) if isinstance(num_stages, (tuple, list)) else (num_stages,) * 3
    if len(stages) != 3:
        raise ValueError(f"num_stages takes one value or three (distance, fine count, attend), got {num_stages}.")
    device = query.device
    group = num_heads // num_kv_heads
    rows_per_group = group * query_len
    per_row_n = isinstance(top_n, torch.Tensor)
    if n_keys == 0 or query_len == 0 or batch == 0 or num_heads == 0 or (not per_row_n and top_n <= 0):
        out = torch.zeros(batch, num_heads, query_len, value_dim, dtype=value.dtype, device=device)
        if return_keep:
            return out, torch.zeros(batch, num_heads, query_len, n_keys, dtype=torch.bool, device=device)
        return out

    r_block = min(16, _next_power_of_2(rows_per_group))
    num_row_blocks = _cdiv(rows_per_group, r_block)
    num_rows = batch * num_kv_heads * rows_per_group
    groups = batch * num_kv_heads * num_row_blocks
    count_block_n = max(16, min(1024, hist_block_elements // r_block))
    # keys per selection tile: 1024 for one row ((128, 8) tiles), 8192 (row, key) pairs for several (2048 keys for
    # the GQA shape's 4 rows, 10-15% faster than 256 there on an H200, decode.json)
    select_block_n = block_n or (1024 if r_block <= 4 else max(64, 8192 // r_block))
    sms = 1 if _interpreting() or not query.is_cuda else _multiprocessor_count(device.index or 0)
    num_splits_given = num_splits is not None
    if num_splits is None:
        if programs_per_sm is None:
            programs_per_sm = 8 if r_block == 1 else 4
        # rounded down: a last, mostly idle wave of programs would cost a whole wave's time
        num_splits = max(1, programs_per_sm * sms // groups)
    # whole 64-key blocks, and at most MAX_ITERATIONS counting blocks per split (the packed 7-bit counters)
    # (a margin: the split length is rounded up to 64 keys, and the distance kernel adds tail blocks over <= 64 keys)
    fewest_splits = _cdiv(n_keys, (MAX_ITERATIONS - 2 - 64 // count_block_n) * count_block_n)
    num_splits, split_len = _splits(n_keys, max(num_splits, fewest_splits))
    if distance_splits is None:
        # by default fewer programs for the distance kernel, unless the split count was given (tests, sweeps)
        chosen = num_splits_given or distance_programs_per_sm is None
        distance_splits = num_splits if chosen else max(1, distance_programs_per_sm * sms // groups)
    distance_splits, distance_split_len = _splits(n_keys, min(num_splits, max(distance_splits, fewest_splits)))
    distance_block_n = min(count_block_n, _next_power_of_2(distance_split_len))
    count_block_n = min(count_block_n, _next_power_of_2(split_len))

    # one byte per (row, key) holds the distance for d <= 128 (0..d, and 255 = masked); d = 256 needs int16
    code_dtype, invalid_code = (torch.uint8, 255) if dim < 255 else (torch.int16, 32767)
    fine = dim // 8
    list_entries = groups * num_splits * split_len  # per program, room for a whole split
    work = _Workspace.get(device)
    code_stride = _cdiv(n_keys, 64) * 64

    def build_layout() -> tuple:
        codes = work.take("codes" + str(code_dtype), num_rows * code_stride, code_dtype)
        ints = work.take("int32", num_rows * (num_splits * (16 + fine + 2) + 8) + list_entries, torch.int32)
        split_rows = num_rows * num_splits
        # int32: coarse counts (16 per row and split), fine counts (fine), quotas (2), stats (8 per row), kept index
        ends = [split_rows * 16, split_rows * fine, split_rows * 2, num_rows * 8, list_entries]
        int_views = torch.split(ints[: sum(ends)], ends)
        floats = work.take("float32", split_rows * (value_dim + 1) + list_entries * r_block, torch.float32)
        # float32: denominators (1 per row and split), numerators (value_dim), kept weights (r_block per entry)
        float_views = torch.split(floats[: split_rows * (value_dim + 1) + list_entries * r_block],
                                  [split_rows, split_rows * value_dim, list_entries * r_block])  # fmt: skip
        tickets = work.take("tickets", 3 * groups, torch.int32, zero=True)
        return (codes, *int_views, *float_views, *torch.split(tickets[: 3 * groups], groups))

    layout_key = (num_rows, num_splits, split_len, code_stride, code_dtype, fine, value_dim, r_block, groups)
    (codes, coarse_counts, fine_counts, quotas, stats, kept_index, denominators, numerators, kept_weight,
     distance_tickets, count_tickets, attend_tickets) = work.layout(layout_key, build_layout)  # fmt: skip
    out = torch.empty(batch, num_heads, query_len, value_dim, dtype=value.dtype, device=device)
    keep_rows = torch.zeros(num_rows, code_stride, dtype=torch.int8, device=device) if return_keep else codes

    if valid_mask is None:
        mask_arg, mask_strides = codes, (0, 0, 0, 0)
    else:
        mask_arg = valid_mask.expand(batch, num_heads, query_len, n_keys).view(torch.uint8)
        mask_strides = mask_arg.stride()
    if per_row_n:
        n_keep = top_n.to(device=device, dtype=torch.int32).expand(batch, num_heads, query_len)
        n_keep_args = (n_keep, *n_keep.stride())
    else:
        n_keep_args = (codes, 0, 0, 0)
    row_fma = r_block == 1 and not single_row_dot
    s_blocks, launch_options = _launch_plan(
        distance_splits, num_splits, split_block, r_block, fine, value_dim, num_warps, stages
    )

    grid = (batch * num_kv_heads, num_row_blocks, num_splits)
    # from d = 64 on, the kernel reads the keys as int64 words: one load per key for d = 64, contiguous over the keys
    word_bits = 64 if dim >= 64 else 32
    kernel_words = _as_int64_words(key_words) if word_bits == 64 else key_words
    with _on_device(device):
        _distance_kernel[(batch * num_kv_heads, num_row_blocks, distance_splits)](
            query,
            kernel_words,
            mask_arg,
            codes,
            coarse_counts,
            stats,
            distance_tickets,
            n_keys,
            code_stride,
            0 if per_row_n else min(top_n, n_keys),
            *n_keep_args,
            rows_per_group,
            query_len,
            group,
            num_kv_heads,
            distance_split_len,
            distance_splits,
            *query.stride(),
            *kernel_words.stride(),
            *mask_strides,
            D=dim,
            W=dim // word_bits,
            WORD_BITS=word_bits,
            R_BLOCK=r_block,
            BLOCK_N=distance_block_n,
            HAS_MASK=valid_mask is not None,
            USE_POPC=query.is_cuda and not _interpreting(),
            INVALID_CODE=invalid_code,
            S_BLOCK=s_blocks[0],
            PER_ROW_N=per_row_n,
            **launch_options[0],
        )
        _fine_count_kernel[grid](
            codes,
            fine_counts,
            stats,
            quotas,
            count_tickets,
            n_keys,
            code_stride,
            rows_per_group,
            split_len,
            num_splits,
            D=dim,
            FINE=fine,
            R_BLOCK=r_block,
            BLOCK_N=count_block_n,
            S_BLOCK=s_blocks[1],
            **launch_options[1],
        )
        _attend_kernel[grid](
            codes,
            stats,
            quotas,
            value,
            kept_index,
            kept_weight,
            denominators,
            numerators,
            out,
            keep_rows,
            attend_tickets,
            n_keys,
            code_stride,
            rows_per_group,
            query_len,
            group,
            num_kv_heads,
            split_len,
            num_splits,
            2.0 * float(alpha) * math.log2(math.e),
            int(alpha >= 0),
            *value.stride(),
            *out.stride(),
            DV=value_dim,
            R_BLOCK=r_block,
            R_DOT=1 if row_fma else max(16, r_block),
            BLOCK_N=select_block_n,
            BLOCK_K=gather_block,
            INVALID_CODE=invalid_code,
            V_IS_FP32=value.dtype == torch.float32,
            # 16-bit values go through tensor cores; fp32 and fp64 values are accumulated in fp32 (tl.dot of fp64 gives
            # fp64, which the fp32 accumulator cannot take)
            DOT_FP32=value.dtype in (torch.float32, torch.float64) or _interpreting(),
            ROW_FMA=row_fma,
            WRITE_KEEP=return_keep,
            S_BLOCK=s_blocks[2],
            **launch_options[2],
        )
    if return_keep:
        keep = keep_rows[:, :n_keys].reshape(batch, num_kv_heads, group, query_len, n_keys).bool()
        return out, keep.view(batch, num_heads, query_len, n_keys)
    return out
