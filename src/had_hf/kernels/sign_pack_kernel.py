"""The Triton sign packer: (..., d) floats to (..., d // 32) int32 sign words, the layout of `int32_words`."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .int32_words import WORD_BITS
from .triton_common import _cdiv, _on_device

__all__ = ["triton_pack_sign_bits"]


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
    """Triton twin of `int32_words.pack_sign_bits`: (..., d) floats to (..., d // 32) int32 sign words, contiguous."""
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
