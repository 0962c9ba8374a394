"""Plain-PyTorch HAD attention of the binary stage over float or packed keys: the op's implementation on every
device, and the reference every kernel must match.

The scores are the exact integers Sb = Qb . Kb (±1 products summed in float32), scaled by alpha, plus the bias if
any; the kept keys come from `had_hf.selection.select_top_n` (the one statement of the top-N rule), their weights
are softmax over the kept logits, and a row with no valid key outputs zeros.
"""

from __future__ import annotations

import torch

from ..selection import causal_valid, select_top_n
from .int32_words import WORD_BITS, as_int32_words, unpack_sign_bits

# Entries of (query x key) work per chunk: the reference holds a few float/bool tensors of this many entries at once,
# so long prefills run in query chunks (exact, as rows are independent) instead of allocating (q x n) for all heads.
_CHUNK_ELEMENTS = 2**25


def unit_keys(key: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ±1 keys of float keys (their signs) or of packed int32/int64 keys (unpacked)."""
    if key.is_floating_point():
        return torch.where(key >= 0, 1.0, -1.0).to(dtype)
    return unpack_sign_bits(key, dtype=dtype)


def _head_dim(key: torch.Tensor) -> int:
    return key.shape[-1] if key.is_floating_point() else as_int32_words(key).shape[-1] * WORD_BITS


def _grouped(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor broadcastable to (B, Hq, q, n) as (B, Hkv, g, q, n)."""
    batch, num_kv_heads, group, query_len, key_len = shape
    return tensor.expand(batch, num_kv_heads * group, query_len, key_len).reshape(shape)


def reference_hamming_topk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid_mask: torch.Tensor | None,
    top_n: int | None,
    alpha: float,
    return_keep: bool = False,
    *,
    top_n_ratio: float | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    sink_keys: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HAD attention of the binary stage in plain PyTorch.

    Args:
        query (`torch.Tensor`): (B, Hq, q, d) floating queries; only their signs are used.
        key (`torch.Tensor`): (B, Hkv, n, d) floating keys, or their packed sign bits (B, Hkv, n, d // 32) int32.
        value (`torch.Tensor`): (B, Hkv, n, dv); Hq must be a multiple of Hkv (grouped-query attention).
        valid_mask (`torch.Tensor`, *optional*): bool, broadcastable to (B, Hq, q, n); True marks keys a query may
            attend to. `None` means all keys are valid.
        top_n (`int`, *optional*): N, the number of keys each query keeps (fewer where fewer are valid); `None` when
            `top_n_ratio` is given.
        alpha (`float`): the scale of the binary scores, sigma_q * sigma_k * scaling (> 0).
        return_keep (`bool`, *optional*, defaults to `False`): also return the bool (B, Hq, q, n) mask of kept keys.
        top_n_ratio (`float`, *optional*): N = ceil(ratio * valid keys of the row) instead of `top_n`.
        bias (`torch.Tensor`, *optional*): additive logits broadcastable to (B, Hq, q, n).
        is_causal (`bool`, *optional*, defaults to `False`): also mask keys after each query (queries are the last q
            of the n positions).
        sink_keys (`int`, *optional*, defaults to 0): each row also keeps its first `sink_keys` valid keys.

    Returns:
        `torch.Tensor`: (B, Hq, q, dv) in the dtype of `value` (and the keep mask if `return_keep`). The weights are
        computed in float32, or float64 for float64 values.
    """
    batch, num_heads, query_len, dim = query.shape
    num_kv_heads, key_len = key.shape[1], key.shape[2]
    if _head_dim(key) != dim:
        raise ValueError(f"Queries have dimension {dim} and keys {_head_dim(key)}.")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} key/value heads evenly.")
    if valid_mask is not None and valid_mask.dtype != torch.bool:
        raise TypeError(f"valid_mask must be bool (True = may attend), got {valid_mask.dtype}.")
    group = num_heads // num_kv_heads
    compute_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    device = query.device

    # (B, Hkv, g, q, .) views put the g query heads of a key/value head next to it: no repeat of keys or values
    unit_q = torch.where(query >= 0, 1.0, -1.0).to(torch.float32).view(batch, num_kv_heads, group, query_len, dim)
    unit_k = unit_keys(key, torch.float32).unsqueeze(2)
    value_c = value.to(compute_dtype).unsqueeze(2)  # converted once, shared by all chunks and all g query heads
    if is_causal:
        causal = causal_valid(query_len, key_len, device)
        valid_mask = causal if valid_mask is None else valid_mask & causal
    if valid_mask is None:
        valid_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)

    outputs, keeps = [], []
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * num_heads * key_len))
    for start in range(0, query_len, rows_per_chunk):
        stop = min(start + rows_per_chunk, query_len)
        shape = (batch, num_kv_heads, group, stop - start, key_len)
        # ±1 products summed in float32 are exact integers (|Sb| <= d <= 2**24)
        scores = torch.matmul(unit_q[:, :, :, start:stop], unit_k.transpose(-1, -2)).to(compute_dtype)
        logits = scores * alpha
        if bias is not None:
            logits = logits + _grouped(bias[..., start:stop, :] if bias.shape[-2] > 1 else bias, shape).to(logits)
        mask = valid_mask[..., start:stop, :] if valid_mask.shape[-2] > 1 else valid_mask
        valid = _grouped(mask, shape)
        # METHOD.md: the N largest binary scores (alpha only sets the softmax temperature), or with a bias the N
        # largest biased logits
        keep = select_top_n(scores if bias is None else logits, valid, top_n, top_n_ratio, sink_keys)
        weights = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0) * keep
        outputs.append(torch.matmul(weights, value_c).to(value.dtype))
        if return_keep:
            keeps.append(keep)

    if outputs:
        output = torch.cat(outputs, dim=3).view(batch, num_heads, query_len, value.shape[-1])
    else:  # no query position
        output = value.new_zeros(batch, num_heads, query_len, value.shape[-1])
    if return_keep:
        keep = (
            torch.cat(keeps, dim=3) if keeps else torch.zeros(batch, num_kv_heads, group, 0, key_len, dtype=torch.bool)
        )
        return output, keep.reshape(batch, num_heads, query_len, key_len)
    return output
