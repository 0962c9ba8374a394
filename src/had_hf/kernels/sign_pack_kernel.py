"""Triton kernels for the signs of float vectors: packed into (..., d // 32) int32 sign words (the layout of
`int32_words`), or as ±1 tensors of the prefill kernels' dots (fp16 and int8 in one pass over the input)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .int32_words import WORD_BITS
from .triton_common import _cdiv, _on_device

__all__ = ["triton_pack_sign_bits", "triton_unit_signs"]


@triton.jit
def _vector_offsets(vector, size_1, size_2, stride_0, stride_1, stride_2):
    """Element offsets of vectors indexed (i0, i1, i2) over up to three leading dims, so that strided (B, H, t, d)
    inputs need no copy."""
    i2 = vector % size_2
    i1 = (vector // size_2) % size_1
    i0 = vector // (size_2 * size_1)
    return i0 * stride_0 + i1 * stride_1 + i2 * stride_2


def _leading_dims(x: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """`x` with at most 3 leading dims (more are flattened into the first), and their sizes and strides padded to 3."""
    lead = list(x.shape[:-1])
    if len(lead) > 3:
        x = x.reshape(-1, *lead[-2:], x.shape[-1])
        lead = list(x.shape[:-1])
    sizes = [1] * (3 - len(lead)) + lead
    strides = [0] * (3 - len(lead)) + [x.stride(i) for i in range(len(lead))]
    return x, sizes, strides


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
    base = _vector_offsets(words // W, size_1, size_2, stride_0, stride_1, stride_2) + (words % W) * 32 * stride_d
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
    x, sizes, strides = _leading_dims(x)
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


@triton.jit(do_not_specialize=("num_vectors",))
def _unit_signs_kernel(
    x_ptr,
    fp16_ptr,
    int8_ptr,
    num_vectors,
    size_1,
    size_2,
    stride_0,
    stride_1,
    stride_2,
    stride_d,
    D: tl.constexpr,
    BLOCK_VECTORS: tl.constexpr,
    WRITE_FP16: tl.constexpr,
    WRITE_INT8: tl.constexpr,
):
    vector = tl.program_id(0).to(tl.int64) * BLOCK_VECTORS + tl.arange(0, BLOCK_VECTORS)
    vector_ok = vector < num_vectors
    offs_d = tl.arange(0, D)
    base = _vector_offsets(vector, size_1, size_2, stride_0, stride_1, stride_2)
    x = tl.load(x_ptr + base[:, None] + offs_d[None, :] * stride_d, mask=vector_ok[:, None], other=0.0)
    unit = tl.where(x >= 0, 1.0, -1.0)  # the sign rule of `int32_words.pack_sign_bits`: x >= 0 (-0.0 too) is +1
    out_at = vector[:, None] * D + offs_d[None, :]
    if WRITE_FP16:
        tl.store(fp16_ptr + out_at, unit.to(tl.float16), mask=vector_ok[:, None])
    if WRITE_INT8:
        tl.store(int8_ptr + out_at, unit.to(tl.int8), mask=vector_ok[:, None])


def triton_unit_signs(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> dict[torch.dtype, torch.Tensor]:
    """The signs of (..., d) floats as contiguous ±1 tensors of x's shape, one per dtype asked for (float16 and/or
    int8), in one pass over `x`; d a power of two up to 256."""
    dim = x.shape[-1]
    if not dtypes or set(dtypes) - {torch.float16, torch.int8} or dim <= 0 or dim & (dim - 1) or dim > 256:
        raise ValueError(
            f"triton_unit_signs needs float16 and/or int8 outputs and d a power of two <= 256; got dtypes {dtypes}, "
            f"shape {tuple(x.shape)}."
        )
    shape = x.shape
    x, sizes, strides = _leading_dims(x)
    outputs = {dtype: torch.empty(x.shape, dtype=dtype, device=x.device) for dtype in dtypes}
    num_vectors = math.prod(sizes)
    if num_vectors > 0:
        block_vectors = max(1, 4096 // dim)
        fp16, int8 = outputs.get(torch.float16), outputs.get(torch.int8)
        with _on_device(x.device):
            _unit_signs_kernel[(_cdiv(num_vectors, block_vectors),)](
                x, fp16 if fp16 is not None else int8, int8 if int8 is not None else fp16, num_vectors, sizes[1],
                sizes[2], *strides, x.stride(-1), D=dim, BLOCK_VECTORS=block_vectors, WRITE_FP16=fp16 is not None,
                WRITE_INT8=int8 is not None,
            )  # fmt: skip
    return {dtype: out.view(shape) for dtype, out in outputs.items()}
