"""HAD attention of the binary stage over packed sign bits: the dispatch between Triton kernels and PyTorch.

`hamming_topk_attention` is what the `hamming_topk` attention function calls in inference. It runs the Triton decode
kernel (`triton_decode.py`) when the tensors are on CUDA, Triton is importable and there are few query positions
(decode); otherwise the plain-PyTorch reference (`reference.py`), which selects exactly the same keys. Keys may be
floats (their signs are packed first) or already packed int32 words, as `had_hf.cache.HADPackedCache` stores them.

Set `HAD_HF_DISABLE_TRITON=1` to force the PyTorch path.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .packing import (
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
    "hamming_topk_attention",
    "is_triton_available",
    "pack_sign_bits",
    "pack_signs",
    "popcount32",
    "reference_hamming_topk_attention",
    "unpack_sign_bits",
]

# Query positions up to which the decode kernel serves a call. Its scratch holds one byte per (query row, key), and
# it spends no work on causal structure, so prefills of many positions go to the PyTorch path (tensor-core matmul).
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
    """Packs the signs of the last dimension into int32 words: the Triton kernel on CUDA, PyTorch elsewhere."""
    if _use_triton(x) and x.shape[-1] & (x.shape[-1] - 1) == 0:
        from .triton_decode import triton_pack_sign_bits

        return triton_pack_sign_bits(x)
    return pack_sign_bits(x)


def hamming_topk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid_mask: torch.Tensor | None,
    top_n: int,
    alpha: float,
) -> torch.Tensor:
    """HAD attention of the binary stage: exact top-N of the Hamming scores, softmax(alpha * Sb) over the kept keys.

    Args:
        query (`torch.Tensor`): (B, Hq, q, d) floating queries; only their signs are used.
        key (`torch.Tensor`): (B, Hkv, n, d) floating keys, or their packed signs (B, Hkv, n, d // 32) int32 (or
            int64 words of 64 dimensions). Hq must be a multiple of Hkv (grouped-query attention, no repeat needed).
        value (`torch.Tensor`): (B, Hkv, n, dv).
        valid_mask (`torch.Tensor`, *optional*): bool, broadcastable to (B, Hq, q, n); True marks keys a query may
            attend to (padding and causal masks). `None` means all keys are valid.
        top_n (`int`): N, the number of keys each query keeps (all valid keys where fewer are valid).
        alpha (`float`): sigma_q * sigma_k * scaling, the softmax temperature of the kept scores.

    Returns:
        `torch.Tensor`: (B, Hq, q, dv) in the dtype of `value`; zeros for a query with no valid key.
    """
    if _kernel_serves(query, key, value, valid_mask):
        from .triton_decode import hamming_topk_decode

        key_words = pack_signs(key) if key.is_floating_point() else as_int32_words(key)
        return hamming_topk_decode(query, key_words, value, valid_mask, top_n, alpha)
    return reference_hamming_topk_attention(query, key, value, valid_mask, top_n, alpha)


def _kernel_serves(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid_mask: torch.Tensor | None
) -> bool:
    if not (_use_triton(query) and key.is_cuda and value.is_cuda) or query.shape[-2] > MAX_DECODE_QUERY_LEN:
        return False
    if valid_mask is not None and valid_mask.dtype != torch.bool:
        return False
    # the kernels accumulate in float32: float64 values keep their precision on the reference path
    if value.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    # the kernels have no backward: anything that needs gradients takes the differentiable reference
    if torch.is_grad_enabled() and (query.requires_grad or value.requires_grad):
        return False
    from .triton_decode import supports_decode_shape

    return supports_decode_shape(query.shape[-1], value.shape[-1])
