"""HAD decode attention in Triton: exact top-N Hamming attention of a few query positions over packed keys.

Decode attention is memory-bound: a step must read every key and the values it keeps. HAD needs only the sign bits
of the keys (d/8 bytes instead of 2d) and N of the n value rows. A sort for the top-N would cost more than the whole
byte budget; binary scores take only d+1 values (Sb = d - 2h with h the Hamming distance), so the exact top-N is a
histogram, a threshold and a tie count.

One long row must fill the GPU, so the keys are split across programs (split-K), and the tie rule of METHOD.md
(exactly N kept, the lower index first among equal scores) needs the splits to agree. Three launches, each program
one (batch, kv head, row block, split); in each, the last program of a row block to finish (an atomic ticket)
reduces what the splits wrote, a tile of splits per load (`decode_split_k`). Short contexts take one launch instead
(below).

1. `decode_distance_kernel`: Hamming distances of the group's query rows to the split's keys, stored as one byte
   per (row, key) ("codes"; masked keys get an invalid code), and a coarse histogram: 9 bins of width d/8. The last
   program finds each row's coarse bin holding the N-th smallest distance.
2. `decode_fine_count_kernel`: re-reads the codes (1 byte per key instead of d/8) and counts the d/8 distances of
   that coarse bin. The last program finds the threshold distance t (the smallest h with count(dist <= h) >= N) and
   hands the tie quota N - count(dist < t) out to the splits in index order (a prefix sum of their tie counts).
3. `decode_attend_kernel`, in two phases. Select: keep dist < t and the split's share of the ties (the first ones in
   index order), and compact the keys kept by any of the program's rows into a list with their weights
   exp(alpha * (Sb - Sb_max)); the row's largest kept score is known in advance, so the splits' partial softmaxes
   share one shift and need no rescaling. Gather: load the listed value rows (every load useful) and accumulate
   their weighted sum, the next tile's rows in flight while a tile is accumulated (`decode_gather`: by hand, or by
   Triton's pipeliner). The last program sums the splits' partial numerators and denominators into the output.

Each row's N comes from its count of valid keys, the total of its coarse histogram, by the rule of
`had_hf.selection.kept_counts` (`decode_split_k._kept_count`; the ratio rule in float64): a call runs no PyTorch
kernel before its launches (inside a compiled step the custom op is opaque: such kernels would run eagerly there).

The histograms are counted in registers, so no cross-thread work happens per key: for the coarse histogram each lane
adds 1 << (7 * bin) to an int64 of packed 7-bit counters (at most 127 iterations per program); for the fine count,
1 << (4 * (dist % 8)) to an int32 of 4-bit counters, one word per 8 distances, added into int32 totals every 15
iterations. The loops keep every (R, BLOCK_N) tensor in one layout (a key word per load, one counter tensor per word),
so that no data moves between threads per iteration.
Loads are vectorized where Triton can see masks constant over 16 keys: the codes' rows are padded with the invalid
code up to a multiple of 64, the last two kernels run over whole, aligned splits, and from d = 64 on the keys are read
as int64 words. The one-row selection works on (BLOCK_N / 8, 8) tiles, each thread's 8 keys contiguous.

Short contexts (`decode_short_kernel`; by default where keys x value dim <= 2^19, 8k keys at dv = 64, and d <= 128,
see `decode_launch.SHORT_MAX_KEY_VALUES`; `short_kernel=True/False` forces the path): one
launch, each program one (batch, kv head, row block) of 1, 2 or 4 query rows over all keys (one row per program unless
that makes more than two programs per multiprocessor), so no split has to agree with another: no codes in memory, no
tickets, no reductions between programs. The program streams the packed keys three times (L1/L2-resident after the
first): the coarse histogram and the smallest valid distance (the same packed counters, added into int32 totals every
127 tiles, and the fine counters every 15), then the fine count of each row's coarse bin, from which it finds t and the
tie quota in registers (`_coarse_bin` and `_threshold_step`, as the split-K kernels' last programs do), then the attend
kernel's selection (dist < t, and the first `quota` ties in index order), which lists the kept keys with their codes
(one row: the gather computes the weights) or the rows' weights. The gather of `decode_gather` follows, 64 value rows
at a time, the next tile's loads issued one iteration ahead.

Grouped-query attention: the g query heads of a kv head (times the query positions) are the rows of one program, so
the keys are read once per group, and a value row kept by any of them is loaded once.

Attention sinks (`sink_keys` k): the threshold and tie quota are those of the top N among all keys; the selection
also keeps each row's valid keys before its sink end: k without a padding mask; with one, the attend kernel reads
each row's first codes until it has seen k valid keys (`triton_common._scanned_sink_ends`), so that no work runs
before the launches either way.

The launch settings (rows per program, splits, tile sizes) come from `decode_launch.decode_launch` (and
`short_decode_launch`), heuristics on the shape; `decode_launch.short_kernel_wanted` picks the path; the keyword
arguments of `hamming_topk_decode` override each choice for the benchmark sweeps. How the
kernels were tuned, and what each choice measured, is in benchmarks/README.md ("Decode kernel design notes").

The kernels run on CUDA and, for tests, on the CPU through Triton's interpreter (`TRITON_INTERPRET=1` before
`triton` is imported); the interpreter lacks libdevice's `popc`, so popcount is then done with bit arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..selection import check_sink_keys, check_top_n_rule
from .decode_launch import (
    SHORT_GATHER_BLOCK,
    SHORT_GATHER_STAGES,
    SHORT_MAX_KEY_VALUES,
    decode_launch,
    short_decode_launch,
    short_kernel_wanted,
)
from .decode_short import short_decode
from .decode_split import split_decode
from .decode_split_k import MAX_ITERATIONS
from .int32_words import WORD_BITS, as_int32_words
from .sign_pack_kernel import triton_pack_sign_bits
from .triton_common import _interpreting, _is_power_of_two, _multiprocessor_count

__all__ = [
    "MAX_ITERATIONS",
    "SHORT_MAX_KEY_VALUES",
    "hamming_topk_decode",
    "supports_decode_shape",
    "triton_pack_sign_bits",
]


def supports_decode_shape(head_dim: int, value_dim: int) -> bool:
    """Whether the decode kernel handles these head dimensions (powers of two: 32..256 for keys, 16..256 values)."""
    return (
        _is_power_of_two(head_dim) and 32 <= head_dim <= 256 and _is_power_of_two(value_dim) and 16 <= value_dim <= 256
    )


def _per_kernel(name: str, option: int | Sequence[int | None] | None) -> tuple:
    """A launch option given for all three kernels or per kernel (distance, fine count, attend), as three entries."""
    entries = tuple(option) if isinstance(option, (tuple, list)) else (option,) * 3
    if len(entries) != 3:
        raise ValueError(f"{name} takes one value or three (distance, fine count, attend), got {option}.")
    return entries


def hamming_topk_decode(
    query: torch.Tensor,
    key_words: torch.Tensor,
    value: torch.Tensor,
    valid_mask: torch.Tensor | None,
    top_n: int | None,
    alpha: float,
    *,
    top_n_ratio: float | None = None,
    num_splits: int | None = None,
    programs_per_sm: int | None = None,
    distance_programs_per_sm: int | None = None,
    distance_splits: int | None = None,
    block_n: int | None = None,
    hist_block_elements: int = 1024,
    num_warps: int | Sequence[int | None] | None = None,
    num_stages: int | Sequence[int | None] | None = None,
    max_registers: int | Sequence[int | None] | None = None,
    split_block: int = 32,
    gather_block: int | None = None,
    gather_stages: int | None = None,
    attend_split_group: int = 1,
    interleave_gather: bool = False,
    single_row_dot: bool = False,
    short_kernel: bool | None = None,
    short_row_block: int | None = None,
    short_num_warps: int | None = None,
    return_keep: bool = False,
    sink_keys: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HAD attention of a few query positions against packed keys, in Triton (exact top-N): three launches split over
    the keys, or, for short contexts when asked, one launch over all keys per program.

    The options from `num_splits` to `single_row_dot` are those of the three-kernel path, `short_row_block` and
    `short_num_warps` those of the short kernel; `block_n`, `hist_block_elements`, `gather_block` and
    `gather_stages` apply to both.

    Args:
        query (`torch.Tensor`): (B, Hq, q, d) floating queries (only their signs are used); q small (decode).
        key_words (`torch.Tensor`): (B, Hkv, n, d // 32) int32 (or (B, Hkv, n, d // 64) int64) packed key signs.
        value (`torch.Tensor`): (B, Hkv, n, dv) values; Hq must be a multiple of Hkv.
        valid_mask (`torch.Tensor`, *optional*): bool broadcastable to (B, Hq, q, n), True = may attend.
        top_n (`int`, *optional*): N, the number of keys each query keeps (never more than its valid keys).
        alpha (`float`): softmax temperature of the kept binary scores.
        top_n_ratio (`float`, *optional*): instead of `top_n`, N = ceil(ratio * v) of each row's v valid keys (the
            rule of `had_hf.selection.kept_counts`), which the kernels count themselves. Exactly one of the two.
        num_splits (`int`, *optional*): number of key splits per row; by default enough for `programs_per_sm`.
        programs_per_sm (`int`, *optional*): programs per multiprocessor that the default `num_splits` aims at
            (more programs keep more loads in flight; fewer read fewer partial results). Defaults to 8 for programs
            of one query row and 4 for programs of several (their `tl.dot` gather holds about twice the registers).
        distance_programs_per_sm (`int`, *optional*): the same for the distance kernel alone, which only needs its
            splits' histograms to add up and can use fewer, longer splits than the two kernels after it (whose
            splits share the tie quotas); at most their split count. `None` (the default), or `num_splits` given:
            the same splits for all three.
        distance_splits (`int`, *optional*): the distance kernel's split count itself (at most `num_splits`).
        block_n (`int`, *optional*): keys per iteration of the selection (attend kernel, short kernel); defaults to
            1024 for programs of one or two rows (and for all of the short kernel's), 512 for four (1024 with
            `sink_keys`), and 8192 // rows (at least 64) for more.
        hist_block_elements (`int`, *optional*, defaults to 1024): (rows x keys) per iteration of the distance and
            counting kernels, and of the short kernel's counting passes.
        num_warps (`int` or three of them, *optional*): warps per program of the kernels, for all three or per kernel
            (distance, fine count, attend; `None` entries: Triton's default, as when unset).
        num_stages (`int` or three of them, *optional*): software-pipelining stages of the kernels' loops, for all
            three or per kernel (distance, fine count, attend; `None` entries: Triton's default, as when unset).
        max_registers (`int` or three of them, *optional*): the most registers per thread of the kernels (ptxas'
            `maxnreg`; more programs fit on a multiprocessor at once, at the risk of spills), for all three or per
            kernel (distance, fine count, attend; `None` entries: the compiler's choice, as when unset).
        split_block (`int`, *optional*, defaults to 32): most splits per tile of the last programs' reductions (a
            power of two); each kernel lowers it to the splits there are and to its register budget.
        gather_block (`int`, *optional*): kept value rows per iteration of the gather (fewer rows per iteration:
            fewer registers, more programs in flight); defaults to 32 for the attend kernel and 64 for the short one.
        gather_stages (`int`, *optional*): the gather loop: 0 issues the next tile's loads by hand one iteration
            ahead; a positive number leaves the loop to Triton's pipeliner with that many stages (asynchronous copies
            on the GPU, several tiles of value rows in flight). The same result. Defaults to 0 for both kernels.
        attend_split_group (`int`, *optional*, defaults to 1): splits of the fine count per split of the attend
            kernel (a power of two): fewer, longer attend programs (fewer partial results for its last programs to reduce) while the
            first two kernels keep their splits.
        interleave_gather (`bool`, *optional*, defaults to `False`): gather the whole tiles of kept value rows listed
            so far after each selection block of the attend kernel, so that its value loads start before the
            selection ends (the same tiles in the same order: the same result). Triton 3.6 failed to compile it for
            sm_90 on a grouped-query call (4 query heads per key-value head, 2 query positions, a causal mask,
            `max_registers=(None, None, 128)`: an MLIR assertion in its coalescing pass); Triton 3.9 compiles it.
        single_row_dot (`bool`, *optional*, defaults to `False`): accumulate a program of one query row with
            `tl.dot` (padded to 16 rows) instead of multiply-adds.
        short_kernel (`bool`, *optional*): run the short-context kernel (`True`) or the three-kernel path (`False`);
            by default the path whose options are given, else the short kernel where keys x value dim is at most
            `SHORT_MAX_KEY_VALUES` (2^19) and d <= 128, the three kernels beyond (`decode_launch.short_kernel_wanted`).
        short_row_block (`int`, *optional*): query rows per program of the short kernel (1, 2 or 4); by default one
            row per program unless that makes more than two programs per multiprocessor.
        short_num_warps (`int`, *optional*): warps per program of the short kernel (Triton's default when unset).
        return_keep (`bool`, *optional*, defaults to `False`): also return the bool (B, Hq, q, n) mask of the kept
            keys (for tests; costs one byte per (row, key)).
        sink_keys (`int`, *optional*, defaults to 0): each row also keeps its first `sink_keys` valid keys
            (`HADConfig.sink_keys`); needs alpha >= 0 (the softmax shift is the smallest distance of the row).

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
    check_sink_keys(sink_keys)
    if sink_keys and (alpha < 0 or (top_n is not None and top_n <= 0)):
        raise ValueError(
            f"Attention sinks need alpha >= 0 (a sink may lie beyond the threshold) and N >= 1, got alpha={alpha}, "
            f"top_n={top_n}."
        )
    if not _is_power_of_two(split_block):
        raise ValueError(f"split_block must be a power of two, got {split_block}.")
    if not _is_power_of_two(hist_block_elements):
        raise ValueError(f"hist_block_elements must be a power of two, got {hist_block_elements}.")
    for name, size in (("block_n", block_n), ("gather_block", gather_block)):
        if size is not None and not (_is_power_of_two(size) and size >= 16):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}.")
    if not (gather_stages is None or (isinstance(gather_stages, int) and gather_stages >= 0)):
        raise ValueError(f"gather_stages must be an integer >= 0, got {gather_stages} (0: the hand-written prefetch).")
    if not (isinstance(attend_split_group, int) and _is_power_of_two(attend_split_group)):
        raise ValueError(
            f"attend_split_group must be a power of two (1 for the fine count's splits), got {attend_split_group}."
        )
    warps, stages = _per_kernel("num_warps", num_warps), _per_kernel("num_stages", num_stages)
    registers = _per_kernel("max_registers", max_registers)
    device = query.device
    group = num_heads // num_kv_heads
    rows_per_group = group * query_len
    check_top_n_rule(top_n, top_n_ratio)
    ratio_rule = top_n_ratio is not None
    if n_keys == 0 or query_len == 0 or batch == 0 or num_heads == 0 or (not ratio_rule and top_n <= 0):
        out = torch.zeros(batch, num_heads, query_len, value_dim, dtype=value.dtype, device=device)
        if return_keep:
            return out, torch.zeros(batch, num_heads, query_len, n_keys, dtype=torch.bool, device=device)
        return out

    sms = 1 if _interpreting() or not query.is_cuda else _multiprocessor_count(device.index or 0)
    options = dict(
        num_splits=num_splits,
        programs_per_sm=programs_per_sm,
        distance_programs_per_sm=distance_programs_per_sm,
        distance_splits=distance_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        max_registers=max_registers,
        split_block=split_block,
        attend_split_group=attend_split_group,
        interleave_gather=interleave_gather,
        single_row_dot=single_row_dot,
        short_kernel=short_kernel,
        short_row_block=short_row_block,
        short_num_warps=short_num_warps,
    )
    if short_kernel_wanted(options, n_keys, dim, value_dim):
        short = short_decode_launch(
            n_keys,
            rows_per_group,
            batch * num_kv_heads,
            sms,
            row_block=short_row_block,
            block_n=block_n,
            hist_block_elements=hist_block_elements,
        )
        out, keep = short_decode(query, key_words, value, valid_mask, top_n, top_n_ratio, alpha, short,
                                 gather_block or SHORT_GATHER_BLOCK,
                                 SHORT_GATHER_STAGES if gather_stages is None else gather_stages, short_num_warps,
                                 return_keep, sink_keys)  # fmt: skip
        return (out, keep) if return_keep else out
    gather_block, gather_stages = gather_block or 32, gather_stages or 0
    settings = decode_launch(
        n_keys,
        rows_per_group,
        batch * num_kv_heads,
        sms,
        num_splits=num_splits,
        programs_per_sm=programs_per_sm,
        distance_programs_per_sm=distance_programs_per_sm,
        distance_splits=distance_splits,
        block_n=block_n,
        hist_block_elements=hist_block_elements,
        sinks=sink_keys > 0,
    )
    out, keep = split_decode(query, key_words, value, valid_mask, top_n, top_n_ratio, alpha, settings, warps, stages,
                             registers, split_block, gather_block, gather_stages, attend_split_group,
                             interleave_gather, single_row_dot, return_keep, sink_keys)  # fmt: skip
    return (out, keep) if return_keep else out
