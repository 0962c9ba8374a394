"""Building blocks of the decode kernels: packed counters and the threshold they give, sign words of queries and
keys and their Hamming distances, and the split-K bookkeeping of the three-kernel path (each program is one
(batch * kv head, row block, split) of the grid; the last split of a row block to finish reduces what all splits
wrote, a tile of splits at a time). The short-context kernel (`decode_short_kernel`) shares all but the last."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import _popcount

# The coarse histogram's packed counters: 9 7-bit fields in an int64 (63 bits). A lane adds at most one per counting
# block, so a split may span at most 127 of them.
MAX_ITERATIONS = 127
# The fine counters' 4-bit fields (8 per int32 word) hold 15: they are added into int32 totals every NIBBLE_TILES
# counting blocks.
NIBBLE_TILES = tl.constexpr(15)


@triton.jit
def _place_fields(counts, acc, FIRST: tl.constexpr, NUM_FIELDS: tl.constexpr, BITS: tl.constexpr):
    """Writes the totals over the lanes of the first NUM_FIELDS BITS-bit fields of (R, X) packed counters (the coarse
    histogram's 7-bit fields in int64, the fine count's 4-bit ones in int32) into columns FIRST .. FIRST + NUM_FIELDS
    - 1 of the (R, C) int32 `counts` (fields past C are dropped)."""
    cols = tl.arange(0, counts.shape[1])
    for field in tl.static_range(NUM_FIELDS):
        if FIRST + field < counts.shape[1]:
            count = tl.sum(((acc >> (BITS * field)) & ((1 << BITS) - 1)).to(tl.int32), axis=1)
            counts = tl.where(cols[None, :] == FIRST + field, count[:, None], counts)
    return counts


@triton.jit
def _add_coarse(coarse, dist, valid, D: tl.constexpr):
    """Adds the valid distances of an (R, BLOCK_N) tile to the lanes' packed coarse counters: 9 bins of width D / 8
    (bin 8 holds distance D alone), one 7-bit field each."""
    one = tl.full(dist.shape, 1, dtype=tl.int64)
    return coarse + tl.where(valid, one << (7 * (dist // (D // 8))).to(tl.int64), 0)


@triton.jit
def _add_fine(fine0, fine1, fine2, fine3, code, low, FINE: tl.constexpr):
    """Adds the codes of an (R, BLOCK_N) tile that fall in the FINE distances low .. low + FINE - 1 to the lanes' 4-bit
    fine counters, 8 fields per int32 word (word k: the distances low + 8k .. low + 8k + 7). Codes outside the bin add
    nothing to its FINE fields (invalid codes exceed D + FINE; with FINE < 8 the fields past FINE, which `_fine_fields`
    does not read, count the next distances). A field holds 15: read them every NIBBLE_TILES tiles."""
    offset = code - low
    field = tl.full(code.shape, 1, dtype=tl.int32) << ((offset & 7) * 4)
    fine0 += tl.where((offset >= 0) & (offset < 8), field, 0)
    if FINE > 8:
        word = offset >> 3
        fine1 += tl.where(word == 1, field, 0)
    if FINE > 16:
        fine2 += tl.where(word == 2, field, 0)
        fine3 += tl.where(word == 3, field, 0)
    return fine0, fine1, fine2, fine3


@triton.jit
def _fine_fields(fine0, fine1, fine2, fine3, R_BLOCK: tl.constexpr, FINE: tl.constexpr):
    """The (R, FINE) int32 totals over the lanes of the 4-bit fine counters (`_add_fine`)."""
    counts = _place_fields(tl.zeros((R_BLOCK, FINE), dtype=tl.int32), fine0, 0, 8, 4)
    if FINE > 8:
        counts = _place_fields(counts, fine1, 8, 8, 4)
    if FINE > 16:
        counts = _place_fields(counts, fine2, 16, 8, 4)
        counts = _place_fields(counts, fine3, 24, 8, 4)
    return counts


@triton.jit
def _coarse_bin(total, num_kept):
    """From the rows' (R, 16) coarse histograms (bins 0..8, zeros after): the coarse bin holding the N-th smallest
    distance (N = `num_kept`; bin 0 when N = 0) and the count of distances in the bins below it."""
    bins = tl.arange(0, 16)
    cumulative = tl.cumsum(total, axis=1)
    coarse_bin = tl.min(tl.where(cumulative >= num_kept[:, None], bins[None, :], 16), axis=1)
    below = tl.sum(tl.where(bins[None, :] < coarse_bin[:, None], total, 0), axis=1)
    return coarse_bin, below


@triton.jit
def _kept_count(valid_count, top_n, top_n_ratio_bits, RATIO: tl.constexpr):
    """N of rows with `valid_count` valid keys, by the rule of `had_hf.selection.kept_counts` (the rule itself; this is
    its copy for the kernels, tested equal to it): `min(top_n, v)`, or with RATIO `min(max(1, ceil(ratio * v)), v)`,
    the product and ceil in float64 as there. The ratio comes as the int64 bits of its float64 (`_float64_bits`):
    Triton would pass a Python float as float32."""
    if RATIO:
        ratio = top_n_ratio_bits.to(tl.int64).to(tl.float64, bitcast=True)
        valid = valid_count.to(tl.float64)
        # clamped to v before the conversion, which then cannot overflow whatever the ratio
        wanted = tl.maximum(tl.minimum(tl.ceil(valid * ratio), valid).to(tl.int32), 1)
    else:
        wanted = top_n
    return tl.minimum(wanted, valid_count)


@triton.jit
def _threshold_step(total, needed, FINE: tl.constexpr):
    """From the rows' (R, FINE) histograms of their coarse bin's distances and the `needed` keys still to keep in it:
    the step of the threshold t in the bin (the smallest with count(dist <= t) >= needed), the tie quota
    needed - count(dist < t), and the count of distances equal to t (0, 0 and the bin's first count when needed = 0)."""
    cols = tl.arange(0, FINE)
    cumulative = tl.cumsum(total, axis=1)
    step = tl.min(tl.where(cumulative >= needed[:, None], cols[None, :], FINE - 1), axis=1)
    quota = needed - tl.sum(tl.where(cols[None, :] < step[:, None], total, 0), axis=1)
    ties = tl.sum(tl.where(cols[None, :] == step[:, None], total, 0), axis=1)
    return step, quota, ties


@triton.jit
def _hamming(q0, q1, q2, q3, k0, k1, k2, k3, W: tl.constexpr, USE_POPC: tl.constexpr):
    """Hamming distances of query and key sign words (W of them; the rest unused), broadcast against each other."""
    dist = _popcount(q0 ^ k0, USE_POPC)
    if W > 1:
        dist += _popcount(q1 ^ k1, USE_POPC)
    if W > 2:
        dist += _popcount(q2 ^ k2, USE_POPC)
        dist += _popcount(q3 ^ k3, USE_POPC)
    return dist


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
def _program_tie_quotas(quota_ptr, grow, row_ok, count_splits, SPLIT_GROUP: tl.constexpr):
    """The rows' tie quotas and tie counts over this program's keys: those of SPLIT_GROUP consecutive splits of the
    fine count (`count_splits` of them), summed. The quotas are handed out to the splits in index order, so the first
    `quota` ties of the union are those that its splits keep."""
    if SPLIT_GROUP == 1:
        at = (grow * count_splits + tl.program_id(2)) * 2
        quota = tl.load(quota_ptr + at, mask=row_ok, other=0)
        ties = tl.load(quota_ptr + at + 1, mask=row_ok, other=0)
    else:
        split = tl.program_id(2) * SPLIT_GROUP + tl.arange(0, SPLIT_GROUP)
        at = (grow[:, None] * count_splits + split[None, :]) * 2
        ok = row_ok[:, None] & (split < count_splits)[None, :]
        quota = tl.sum(tl.load(quota_ptr + at, mask=ok, other=0), axis=1)
        ties = tl.sum(tl.load(quota_ptr + at + 1, mask=ok, other=0), axis=1)
    return quota, ties


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


# Integers that change at every decode step (or with the model's N rule) and only bound loops or enter arithmetic: not
# specialized, so that their divisibility by 16 changing from one step to the next compiles nothing. Everything that
# enters an address (the row stride of the codes is padded to a multiple of 64 for this) stays specialized: Triton
# vectorizes loads only when it knows alignment.
_PER_STEP = ("n_keys", "top_n", "top_n_ratio_bits")
