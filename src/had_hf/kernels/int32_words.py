"""Sign bits packed into 32-bit words, and Hamming scores between packed vectors, in plain PyTorch.

A binarized vector of dimension d is stored as d/32 int32 words: bit i of word w is dimension 32*w + i, and a set
bit means +1 (x >= 0, so sign(0) = +1 as in METHOD.md). Two such vectors have the dot product

    Sb = Qb . Kb = d - 2 * popcount(q_bits XOR k_bits),

an integer in [-d, d] with the parity of d. These functions run on any device; they are the reference for the
Triton kernels (`sign_pack_kernel.py`, `triton_decode.py`) and the storage format of `had_hf.cache.HADPackedCache`.
"""

from __future__ import annotations

import torch

WORD_BITS = 32

# popcount of every byte value: torch has no popcount, and a 256-entry lookup is exact on every device
_BYTE_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.uint8)


def _check_dim(dim: int) -> None:
    if dim <= 0 or dim % WORD_BITS:
        raise ValueError(f"Sign packing needs a last dimension that is a positive multiple of 32, got {dim}.")


def pack_sign_bits(x: torch.Tensor) -> torch.Tensor:
    """Packs the signs of the last dimension of `x` into int32 words.

    Args:
        x (`torch.Tensor`): (..., d) floating tensor, d a multiple of 32.

    Returns:
        `torch.Tensor`: (..., d // 32) int32; bit i of word w is set where `x[..., 32 * w + i] >= 0`.
    """
    _check_dim(x.shape[-1])
    bits = (x >= 0).reshape(*x.shape[:-1], x.shape[-1] // WORD_BITS, WORD_BITS).to(torch.int64)
    shifts = torch.arange(WORD_BITS, device=x.device, dtype=torch.int64)
    words = (bits << shifts).sum(dim=-1)
    # the words are unsigned 32-bit values in int64; fold bit 31 into the int32 sign explicitly
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def as_int32_words(words: torch.Tensor) -> torch.Tensor:
    """Views packed words as int32; int64 words (64 dimensions each, little-endian) become two int32 words."""
    if words.dtype == torch.int32:
        return words
    if words.dtype == torch.int64:
        return words.contiguous().view(torch.int32)
    raise TypeError(f"Packed sign bits must be int32 or int64 words, got {words.dtype}.")


def unpack_sign_bits(words: torch.Tensor, dim: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `pack_sign_bits`: the ±1 vectors.

    Args:
        words (`torch.Tensor`): (..., d // 32) int32 (or int64) words.
        dim (`int`, *optional*): d; defaults to 32 times the number of int32 words.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): dtype of the result.

    Returns:
        `torch.Tensor`: (..., d) with values in {-1, +1}.
    """
    words = as_int32_words(words)
    if dim is None:
        dim = words.shape[-1] * WORD_BITS
    if dim != words.shape[-1] * WORD_BITS:
        raise ValueError(f"{words.shape[-1]} words hold {words.shape[-1] * WORD_BITS} dimensions, not {dim}.")
    shifts = torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift; the mask keeps only the bit asked for
    signs = bits.to(dtype) * 2 - 1
    return signs.reshape(*words.shape[:-1], dim)


def popcount32(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int32 word, as int32."""
    words = words.contiguous()
    table = _BYTE_POPCOUNT.to(words.device)
    per_byte = table[words.view(torch.uint8).long()]
    return per_byte.reshape(*words.shape, 4).sum(dim=-1, dtype=torch.int32)


def hamming_scores_packed(q_words: torch.Tensor, k_words: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Binary dot products `Sb = d - 2 * hamming(q, k)` of packed vectors, by XOR and popcount.

    Args:
        q_words (`torch.Tensor`): (..., m, W) int32 words of the queries.
        k_words (`torch.Tensor`): (..., n, W) int32 words of the keys; leading dimensions broadcast with `q_words`.
        dim (`int`, *optional*): d; defaults to 32 * W.

    Returns:
        `torch.Tensor`: (..., m, n) int32 scores in [-d, d].
    """
    q_words, k_words = as_int32_words(q_words), as_int32_words(k_words)
    if q_words.shape[-1] != k_words.shape[-1]:
        raise ValueError(f"Queries have {q_words.shape[-1]} words per vector and keys {k_words.shape[-1]}.")
    if dim is None:
        dim = q_words.shape[-1] * WORD_BITS
    differing = popcount32(q_words.unsqueeze(-2) ^ k_words.unsqueeze(-3)).sum(dim=-1, dtype=torch.int32)
    return dim - 2 * differing
