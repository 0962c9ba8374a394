"""Sign bits packed into uint64 words: the bit layout of the exported golden data.

A binarized vector of dimension d is stored as `ceil(d / 64)` uint64 words:

    bit i of word j  =  dimension 64 * j + i        (bit 0 is the least significant bit)
    bit set          =  +1  (x >= 0, so sign(0) = +1 as in METHOD.md)
    bits beyond d    =  0   (they are 0 in queries and keys alike, so they never count in a XOR)

Two packed vectors then have the binary dot product

    Sb = d - 2 * popcount(q_words XOR k_words),

the integer logit of HAD attention before it is scaled by alpha. Everything here is plain numpy: a hardware engineer
reading the golden files needs nothing else. (`had_hf.kernels.int32_words` is the int32, torch-side layout of the GPU
kernels and the packed KV cache; this module is the export format.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

WORD_BITS = 64

_SHIFTS = np.arange(WORD_BITS, dtype=np.uint64)
# popcount of every byte value, for numpy < 2.0 where np.bitwise_count does not exist
_BYTE_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)


def num_words(dim: int) -> int:
    """Number of uint64 words that hold `dim` sign bits."""
    if dim < 1:
        raise ValueError(f"A packed vector needs at least one dimension, got {dim}.")
    return -(-dim // WORD_BITS)


def _as_numpy(x: Any) -> np.ndarray:
    # torch tensors (also on GPU or with gradients) become numpy without importing torch here
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def pack_signs(x: Any) -> np.ndarray:
    """Packs the signs of the last dimension of `x` into uint64 words.

    Args:
        x (`np.ndarray` or `torch.Tensor`):
            (..., d) values: ±1 (any integer or float dtype), or any real numbers whose sign is taken
            (`x >= 0` is +1). NaN is refused.

    Returns:
        `np.ndarray`: (..., ceil(d / 64)) uint64; bit i of word j is set where `x[..., 64 * j + i] >= 0`.
    """
    x = _as_numpy(x)
    if x.ndim == 0:
        raise ValueError("pack_signs needs at least one dimension (the vector dimension is the last one).")
    if x.dtype.kind == "f" and np.isnan(x).any():
        raise ValueError("pack_signs got NaN values, which have no sign.")
    dim = x.shape[-1]
    words = num_words(dim)
    bits = np.zeros((*x.shape[:-1], words * WORD_BITS), dtype=np.uint64)
    bits[..., :dim] = x >= 0
    bits = bits.reshape(*x.shape[:-1], words, WORD_BITS)
    return np.bitwise_or.reduce(bits << _SHIFTS, axis=-1)


def unpack_signs(words: Any, dim: int) -> np.ndarray:
    """Inverse of `pack_signs`: the ±1 vectors.

    Args:
        words (`np.ndarray`): (..., W) uint64 words (int64 words are reinterpreted bit for bit).
        dim (`int`): d, the number of dimensions stored; `W` must be `ceil(d / 64)`.

    Returns:
        `np.ndarray`: (..., d) int8 with values in {-1, +1}.
    """
    words = _as_uint64(words)
    if words.shape[-1] != num_words(dim):
        raise ValueError(f"{dim} dimensions take {num_words(dim)} words, but the array has {words.shape[-1]}.")
    bits = (words[..., None] >> _SHIFTS) & np.uint64(1)
    bits = bits.reshape(*words.shape[:-1], words.shape[-1] * WORD_BITS)[..., :dim]
    return bits.astype(np.int8) * 2 - 1


def popcount(words: Any) -> np.ndarray:
    """Number of set bits of each uint64 word, as int64."""
    words = _as_uint64(words)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).astype(np.int64)
    per_byte = _BYTE_POPCOUNT[np.ascontiguousarray(words).view(np.uint8)]
    return per_byte.reshape(*words.shape, 8).sum(axis=-1, dtype=np.int64)


def hamming_distance(query_words: Any, key_words: Any) -> np.ndarray:
    """Hamming distances between every packed query and every packed key, by XOR and popcount.

    Args:
        query_words (`np.ndarray`): (..., m, W) uint64 words.
        key_words (`np.ndarray`): (..., n, W) uint64 words; leading dimensions broadcast with `query_words`.

    Returns:
        `np.ndarray`: (..., m, n) int64 distances in [0, d].
    """
    query_words, key_words = _as_uint64(query_words), _as_uint64(key_words)
    if query_words.shape[-1] != key_words.shape[-1]:
        raise ValueError(f"Queries have {query_words.shape[-1]} words per vector and keys {key_words.shape[-1]}.")
    differing = np.bitwise_xor(query_words[..., :, None, :], key_words[..., None, :, :])
    return popcount(differing).sum(axis=-1)


def binary_scores(query_words: Any, key_words: Any, dim: int) -> np.ndarray:
    """The integer logits `Sb = d - 2 * hamming(q, k)` of packed queries and keys (see `hamming_distance`)."""
    return dim - 2 * hamming_distance(query_words, key_words)


def _as_uint64(words: Any) -> np.ndarray:
    words = _as_numpy(words)
    if words.dtype == np.uint64:
        return words
    if words.dtype == np.int64:
        return words.view(np.uint64)
    raise TypeError(f"Packed sign bits must be uint64 (or int64) words, got {words.dtype}.")
