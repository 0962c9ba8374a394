"""Triton kernels for HAD prefill: exact top-N Hamming attention of many query positions, memory linear in n.

Dense attention of q query positions against n keys is tiled like FlashAttention: a program owns a block of
BLOCK_M query rows of one (batch, query head) and streams the keys in tiles of BLOCK_N, so no (q x n) tensor exists.
HAD adds a selection: each row keeps exactly N keys (METHOD.md section 1: the largest binary scores, the lower key
index first among equal scores, never a masked key). Binary scores take only d + 1 values, Sb = 2u - d with u the
number of agreeing signs, so the kept set of a row is described by three numbers: a threshold level t, the count of
keys above it, and a tie quota (how many keys AT the threshold are kept, the first ones in index order). Two kernels,
each one pass over the keys per round:

1. `_threshold_kernel` (`prefill_threshold_kernel`) finds t and the quota of every row by counting. A round places 4
   cuts p0 < p1 < p2 < p3 per row and counts, in one sweep over the row's keys, the valid keys with u >= p_j. The
   counts narrow the interval [A, B] of levels that holds t (count(u >= A) >= N > count(u >= B + 1)); the row is
   resolved when A == B, and then count(u > t) and the tie quota N - count(u > t) are known exactly. Rounds repeat over
   the whole row block until all its rows are resolved (an interval of at most 4 levels is resolved in one round, a
   wider one shrinks about 5x per round). To make one round enough, the first round's cuts are a window of 4
   consecutive levels (resolving t in g - 1 .. g + 1) around an estimate g: the same rounds run first on a sample of
   SAMPLE_TILES key tiles spread evenly over the row block's key range (n / 16 keys, 256 to 1024, by default), with the
   target scaled to the sample, N * sample / range. For random keys the sample's quantile is then within a level of t
   for nearly every row (its standard error is 0.2 to 0.4 levels), so a row block usually costs 3 or 4 sweeps over the
   sample plus one over all keys. A block whose key range is no longer than the sample is counted whole (2 to 4 rounds
   over a few tiles). The sweep over all keys also takes each row's largest valid score, the softmax shift of the
   second kernel. The counts live in per-lane counters, (BLOCK_M, BLOCK_N) per cut, summed over the keys once per chunk
   of tiles: on the GPU the scores are converted to fp16 (exact) and the counters are fp16, a compare that writes 1.0
   or 0.0 into each half of a word and a packed add per pair of keys and cut (inline PTX); elsewhere fp32, the same per
   key.
2. `_attend_kernel` (`prefill_attend_kernel`) streams the key and value tiles again, in increasing key order, and
   accumulates exp(alpha * (Sb - Sb_max)) V over the kept keys: Sb > t, or Sb == t among the first `quota` ties of the
   row. The row's largest score is known, so the softmax needs no running maximum and no rescaling. A key is kept when
   its score reaches its cut: t for a tie within the row's quota, t + 1 otherwise (scores step by 2). In a block where
   some row's quota is smaller than its number of ties (the usual case), the rows count the ties seen so far, and every
   tile ranks its ties: an inclusive prefix count along the keys, computed on the tensor cores as a product with a
   (BLOCK_N x BLOCK_N) upper-triangular matrix of ones (exact: integers below 2^11 in fp16 products with fp32
   accumulation), clamped against the row's remaining quota into a 0/1 term of the cut. The weights are one expression,
   exp2(min(alpha' * (Sb - Sb_max), GATE * (Sb - cut))) with GATE = 1e4, with no (BLOCK_M, BLOCK_N) boolean tensors
   (they live in predicate registers, 7 per thread, and would spill).

Scores: in the threshold kernel, the signs of queries and keys as ±1 fp16 tiles and `tl.dot` with fp32 accumulation
(exact: |Sb| <= d <= 128; converted to fp16 for the counting on the GPU), or int8 ±1 dots (int32 accumulation) or
XOR/popcount of packed sign words (`score_mode`, for the benchmark's comparison); in the attend kernel, int8 ±1 dots
by default on the GPU, or fp16 ones (`attend_mode`).
The launch settings come from `prefill_launch.default_prefill_config`, a heuristic on the shape.
The keys' signs are converted once per call into (B, Hkv, n, d) ±1 tensors that the kernels read as tiles, one per
dot type the two kernels use (fp16 and int8 by default; on the GPU both in one pass, `sign_pack_kernel`).

Masks: the keys past the causal limit (query i of the last q positions attends keys j <= i + n - q) are skipped
tile by tile and masked inside the diagonal tiles; a padding mask is read per key when it does not vary over the
query positions (the usual (B, 1, 1, n)), per (row, key) otherwise. Grouped-query attention: query head h reads kv
head h // (Hq / Hkv), no copy. A row with N = 0 (no valid key) keeps nothing and outputs zeros. Attention sinks
(`sink_keys` k): the threshold kernel is unchanged (the top N is chosen among all keys), and the attend kernel also
keeps each row's valid keys before its sink end (k without a padding mask, else `selection.sink_ends` of the mask,
see `triton_common.sink_args`), in the tiles before the block's last sink end only.

Memory: the output, the ±1 keys (n x d per kv head, 3 bytes each by default: fp16 and int8), and 16 bytes per query
row (threshold, quota, largest score, a flag) between the kernels. `return_keep` (tests) adds a (q x n) byte mask.

The kernels run on CUDA and, for tests, on the CPU through Triton's interpreter (`TRITON_INTERPRET=1` before
`triton` is imported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from ..selection import check_sink_keys
from .int32_words import as_int32_words, pack_sign_bits, unpack_sign_bits
from .prefill_attend_kernel import _attend_kernel
from .prefill_launch import PrefillConfig, default_prefill_config, supports_prefill
from .prefill_threshold_kernel import _threshold_kernel
from .prefill_tiles import MAX_ROUNDS, SCORE_MODES
from .triton_common import _interpreting, _is_power_of_two, _on_device, sink_args

__all__ = [
    "PrefillConfig",
    "default_prefill_config",
    "hamming_topk_prefill",
    "prefill_attend_pass",
    "prefill_threshold_pass",
    "prepare_prefill",
    "supports_prefill",
]


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
    sinks: tuple = (None, 0, 0)  # the attend kernel's sink arguments (`triton_common.sink_args`)

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        batch, num_heads, query_len, dim = self.query.shape
        return batch, num_heads, self.value.shape[1], query_len, self.value.shape[2], dim


def _unit_keys(key: torch.Tensor, dim: int, dtypes: tuple[torch.dtype, ...]) -> dict[torch.dtype, torch.Tensor]:
    """(B, Hkv, n, d) ±1 keys in each of `dtypes` (fp16, int8) from float keys (on the GPU: one Triton pass for
    all of them) or packed sign words."""
    if not key.is_floating_point():
        return {dtype: unpack_sign_bits(key, dim, dtype=dtype) for dtype in dtypes}
    if key.is_cuda and not _interpreting():
        from .sign_pack_kernel import triton_unit_signs

        return triton_unit_signs(key, dtypes)
    positive = key >= 0
    return {dtype: positive.to(dtype).mul_(2).sub_(1) for dtype in dtypes}


def _sign_words(x: torch.Tensor) -> torch.Tensor:
    """Packed sign words, int64 (64 dimensions each) from d = 64 on, int32 for d = 32."""
    if x.is_floating_point():
        if x.is_cuda and not _interpreting():
            from .sign_pack_kernel import triton_pack_sign_bits

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
    sink_keys: int = 0,
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
    if not 1 <= config.count_chunk <= 2048:
        raise ValueError(f"count_chunk must be 1 to 2048 tiles (fp16 counters), got {config.count_chunk}.")
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
    modes = {config.attend_mode} | ({config.score_mode} - {"popcount"})
    units = _unit_keys(key, dim, tuple(dtypes[mode] for mode in sorted(modes)))
    attend_keys = units[dtypes[config.attend_mode]]
    query_words = None
    if config.score_mode == "popcount":
        threshold_keys = _sign_words(key)
        query_words = _sign_words(query)
    else:
        threshold_keys = units[dtypes[config.score_mode]]
    if not isinstance(num_kept, torch.Tensor):
        num_kept = torch.tensor(int(num_kept), dtype=torch.int32, device=query.device)
    num_kept = num_kept.to(device=query.device, dtype=torch.int32)
    while num_kept.dim() < 3:
        num_kept = num_kept.unsqueeze(0)
    num_kept = num_kept.expand(batch, num_heads, query_len)
    mask = None
    if valid_mask is not None:
        mask = valid_mask.expand(batch, num_heads, query_len, n_keys).view(torch.uint8)
    check_sink_keys(sink_keys)
    sinks = sink_args(sink_keys, valid_mask, (batch, num_heads, query_len), num_kept)
    return PreparedPrefill(
        query, query_words, threshold_keys, attend_keys, value, mask, num_kept, is_causal, float(alpha), config, sinks
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
            # fp16 scores counted two keys per instruction (inline PTX: the GPU only)
            PACKED=mode == 0 and prep.query.is_cuda and not _interpreting(),
            COUNT_CHUNK=config.count_chunk,
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
                prep.sinks[0],
                query_len,
                n_keys,
                n_keys - query_len,
                num_heads // num_kv_heads,
                num_heads,
                prep.alpha * math.log2(math.e),
                prep.sinks[1],
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
                SINKS=prep.sinks[2],
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
    sink_keys: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HAD attention of the binary stage for many query positions (prefill, encoders), exact top-N, in Triton.

    Args:
        query (`torch.Tensor`): (B, Hq, q, d) fp16/bf16/fp32 queries; only their signs are used. d in (32, 64, 128).
        key (`torch.Tensor`): (B, Hkv, n, d) floating keys (signs used), or their packed sign words (B, Hkv, n,
            d // 32) int32 as `int32_words.pack_sign_bits` makes them (or int64 words of 64 dimensions).
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
        sink_keys (`int`, *optional*, defaults to 0): each row also keeps its first `sink_keys` valid keys
            (`HADConfig.sink_keys`).

    Returns:
        `torch.Tensor`: (B, Hq, q, dv) in the dtype of `value` (and the kept mask if `return_keep`).
    """
    prep = prepare_prefill(query, key, value, valid_mask, is_causal, num_kept, alpha, config, sink_keys)
    if value.shape[2] == 0 or query.shape[2] == 0:  # no keys: every row outputs zeros
        return prefill_attend_pass(prep, None, return_keep=return_keep)
    stats = prefill_threshold_pass(prep)
    return prefill_attend_pass(prep, stats, return_keep=return_keep)
