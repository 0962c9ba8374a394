"""HAD attention of the binary stage over packed sign bits: the PyTorch reference and the Triton kernels.

`had_hf.ops.hamming_topk_attention` (the `had::hamming_topk_attention` op) runs the plain-PyTorch reference
(`reference.py`) on every device, and on CUDA the Triton kernel that `triton_kernel_for` names, when one serves the
call. Keys may be floats (their signs are packed first) or already packed int32 words, as
`had_hf.cache.HADPackedCache` stores them.

Set `HAD_HF_DISABLE_TRITON=1` to force the PyTorch path.

The modules: `int32_words` (the int32 sign-word layout, in PyTorch), `reference` (the PyTorch attention),
`triton_common` (what the Triton kernels share), `sign_pack_kernel`; decode: `triton_decode` (the entry point),
`decode_launch` (launch settings and scratch memory), `decode_split` (the split-K path's host side: its three
launches), `decode_split_k` (what its kernels share), `decode_distance_kernel`, `decode_fine_count_kernel`,
`decode_attend_kernel`, `decode_gather`, `decode_short_kernel` and `decode_short` (short contexts, one launch: the
kernel and its host side); prefill: `triton_prefill` (the entry point), `prefill_launch`, `prefill_tiles`, `prefill_threshold_kernel`,
`prefill_attend_kernel`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

from ..selection import causal_valid, kept_counts
from .int32_words import (
    WORD_BITS,
    as_int32_words,
    hamming_scores_packed,
    pack_sign_bits,
    popcount32,
    unpack_sign_bits,
)
from .reference import reference_hamming_topk_attention

__all__ = [
    "MAX_DECODE_QUERY_LEN",
    "WORD_BITS",
    "as_int32_words",
    "hamming_scores_packed",
    "is_triton_available",
    "pack_sign_bits",
    "pack_signs",
    "popcount32",
    "reference_hamming_topk_attention",
    "triton_kernel_for",
    "unpack_sign_bits",
]

# Query positions up to which the decode kernel serves a call (its scratch holds one byte per (query row, key), and it
# spends no work on causal structure); longer calls go to the prefill kernel (`triton_prefill.py`).
MAX_DECODE_QUERY_LEN = 16


@functools.cache
def is_triton_available() -> bool:
    """Whether the Triton kernels can be used: triton importable, and not disabled by `HAD_HF_DISABLE_TRITON=1`."""
    if os.environ.get("HAD_HF_DISABLE_TRITON", "0") == "1" or importlib.util.find_spec("triton") is None:
        return False
    try:
        from . import triton_decode  # noqa: F401  (compiles nothing: the kernels are compiled at first launch)
    except Exception:  # an incompatible triton (missing histogram, libdevice, ...) means the PyTorch path
        return False
    return True


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and is_triton_available()


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Packs the signs of the last dimension into int32 words: the Triton kernel on CUDA, PyTorch elsewhere and
    under `torch.compile` (which fuses the PyTorch packing of a decode step's few new keys)."""
    if torch.compiler.is_compiling():
        return pack_sign_bits(x)
    if _use_triton(x) and x.shape[-1] & (x.shape[-1] - 1) == 0:
        from .triton_decode import triton_pack_sign_bits

        return triton_pack_sign_bits(x)
    return pack_sign_bits(x)


KernelFunction = Callable[..., torch.Tensor]


def triton_kernel_for(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    sink_keys: int = 0,
    alpha: float = 1.0,
) -> KernelFunction | None:
    """The Triton kernel that serves this call of `had::hamming_topk_attention`, or `None` for the PyTorch reference.

    The one place that decides: CUDA tensors with Triton available, no additive bias (the kernels select on the
    binary scores alone), alpha > 0 for prefill calls and for attention sinks (the kernels' softmax shift is the
    row's largest kept score, which a sink never exceeds then), a boolean mask, 16/32-bit values (float64 keeps its
    precision on the reference path), no gradient needed (the kernels have no backward), and a shape the kernel
    takes. The returned function has the op's arguments less `bias`, and `sink_keys` last.
    """
    if not (_use_triton(query) and key.is_cuda and value.is_cuda) or bias is not None or (sink_keys and alpha <= 0):
        return None
    if mask is not None and mask.dtype != torch.bool:
        return None
    if value.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    if torch.is_grad_enabled() and (query.requires_grad or value.requires_grad):
        return None
    if query.shape[-2] > MAX_DECODE_QUERY_LEN:
        from .triton_prefill import supports_prefill

        return _prefill if supports_prefill(query, key, value) and alpha > 0 else None
    from .triton_decode import supports_decode_shape

    return _decode if supports_decode_shape(query.shape[-1], value.shape[-1]) else None


def _row_counts(mask: torch.Tensor | None, is_causal: bool, query_len: int, key_len: int, device) -> torch.Tensor:
    """How many keys each query row may attend to, broadcastable to (B, Hq, q), without a (q x n) tensor when there
    is no mask."""
    if mask is None:
        if is_causal:
            return (torch.arange(query_len, device=device) + (key_len - query_len + 1)).clamp(0, key_len)[None, None]
        return torch.full((1, 1, 1), key_len, device=device)
    if is_causal:
        mask = mask & causal_valid(query_len, key_len, mask.device)
    return mask.sum(dim=-1)


def _prefill(query, key, value, mask, is_causal, top_n, top_n_ratio, alpha, sink_keys=0) -> torch.Tensor:
    from .triton_prefill import hamming_topk_prefill

    counts = _row_counts(mask, is_causal, query.shape[-2], key.shape[-2], query.device)
    rows_n = kept_counts(counts, top_n, top_n_ratio)
    return hamming_topk_prefill(query, key, value, mask, is_causal, rows_n, alpha, sink_keys=sink_keys)


def _decode(query, key, value, mask, is_causal, top_n, top_n_ratio, alpha, sink_keys=0) -> torch.Tensor:
    from .triton_decode import hamming_topk_decode

    query_len, key_len = query.shape[-2], key.shape[-2]
    if is_causal and query_len > 1:
        causal = causal_valid(query_len, key_len, query.device)
        mask = causal if mask is None else mask & causal
    key_words = pack_signs(key) if key.is_floating_point() else as_int32_words(key)
    # each program counts its rows' valid keys and applies the N rule itself: no PyTorch work before the launch
    return hamming_topk_decode(query, key_words, value, mask, top_n, alpha, top_n_ratio=top_n_ratio,
                               sink_keys=sink_keys)  # fmt: skip
