"""Launch settings of the prefill kernels from the shape, and which tensors the kernels serve."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .int32_words import WORD_BITS, as_int32_words
from .triton_common import _is_power_of_two


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
    count_chunk: int = 1024  # threshold kernel: tiles counted per lane before the row sums (fp16 counters: <= 2048)
    score_mode: str = "dot16"  # threshold kernel: dot16 | dot8 | popcount
    attend_mode: str = "dot16"  # attend kernel: dot16 | dot8


def default_prefill_config(
    head_dim: int,
    value_dim: int,
    num_keys: int,
    interpreting: bool = False,
    value_dtype: torch.dtype = torch.bfloat16,
    row_mask: bool = False,
) -> PrefillConfig:
    """Launch settings from the shape: tiles of 128 query rows x 64 keys and 8 warps for both kernels; 32-key tiles
    for the threshold kernel at d = 128 or with a per-row mask, and for the attend kernel with 256-wide or fp32
    values (64 rows there); benchmarks/README.md ("Prefill kernel design notes") has what ptxas reports for them,
    from `tests/kernels/hopper_compile_probe.py`. The threshold kernel's scores from fp16 dots (counted as fp16
    pairs), the attend kernel's from int8 dots (the faster at the benchmark shapes measured with both). The sample
    covers n / 16 keys, 256 to 1024. Under the interpreter (tests): small tiles, so that small problems span several
    tiles and rounds, samples of 2 tiles, and the threshold kernel's counters summed every 2 tiles."""
    if interpreting:
        return PrefillConfig(
            block_m=32, block_n=16, attend_block_m=32, attend_block_n=16, sample_tiles=2, threshold_warps=1,
            attend_warps=1, threshold_stages=1, attend_stages=1, count_chunk=2,
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
        attend_mode="dot8",
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
