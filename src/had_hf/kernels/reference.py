"""Plain-PyTorch HAD attention over float or packed keys: the reference every kernel must match.

Selection follows METHOD.md section 1 exactly: per query row, keep N = min(top_n, valid keys) keys with the largest
binary scores Sb, the lower key index first among equal scores; masked keys are never kept; the kept keys get
softmax(alpha * Sb) weights and a row with no valid key outputs zeros.
"""

from __future__ import annotations

import torch

from .packing import WORD_BITS, as_int32_words, unpack_sign_bits

# Entries of (query x key) work per chunk: the reference holds a few int64/float tensors of this many entries at once,
# so long prefills run in query chunks (exact, as rows are independent) instead of allocating (q x n) for all heads.
_CHUNK_ELEMENTS = 2**25


def unit_keys(key: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ±1 keys of float keys (their signs) or of packed int32/int64 keys (unpacked)."""
    if key.is_floating_point():
        return torch.where(key >= 0, 1.0, -1.0).to(dtype)
    return unpack_sign_bits(key, dtype=dtype)


def _head_dim(key: torch.Tensor) -> int:
    return key.shape[-1] if key.is_floating_point() else as_int32_words(key).shape[-1] * WORD_BITS


def reference_hamming_topk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid_mask: torch.Tensor | None,
    top_n: int,
    alpha: float,
    return_keep: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HAD attention of the binary stage in plain PyTorch.

    Args:
        query (`torch.Tensor`): (B, Hq, q, d) floating queries; only their signs are used.
        key (`torch.Tensor`): (B, Hkv, n, d) floating keys, or their packed sign bits (B, Hkv, n, d // 32) int32.
        value (`torch.Tensor`): (B, Hkv, n, dv); Hq must be a multiple of Hkv (grouped-query attention).
        valid_mask (`torch.Tensor`, *optional*): bool, broadcastable to (B, Hq, q, n); True marks keys a query may
            attend to. `None` means all keys are valid.
        top_n (`int`): N, the number of keys each query keeps (fewer where fewer are valid).
        alpha (`float`): softmax temperature of the kept scores, sigma_q * sigma_k * scaling.
        return_keep (`bool`, *optional*, defaults to `False`): also return the bool (B, Hq, q, n) mask of kept keys.

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
    group = num_heads // num_kv_heads
    compute_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    device = query.device

    # (B, Hkv, g, q, .) views put the g query heads of a key/value head next to it: no repeat of keys or values
    unit_q = torch.where(query >= 0, 1.0, -1.0).to(torch.float32).view(batch, num_kv_heads, group, query_len, dim)
    unit_k = unit_keys(key, torch.float32)
    if valid_mask is None:
        valid_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    elif valid_mask.dtype != torch.bool:
        raise TypeError(f"valid_mask must be bool (True = may attend), got {valid_mask.dtype}.")
    valid_mask = valid_mask.expand(batch, num_heads, query_len, key_len).view(
        batch, num_kv_heads, group, query_len, key_len
    )

    output = torch.zeros(batch, num_kv_heads, group, query_len, value.shape[-1], dtype=value.dtype, device=device)
    keep_all = torch.zeros(valid_mask.shape, dtype=torch.bool, device=device) if return_keep else None
    num_kept = max(0, min(top_n, key_len))
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * num_heads * key_len))
    # lower index wins a tie: rank (score, -index) lexicographically through one int64 key per entry
    tie_break = (key_len - 1 - torch.arange(key_len, device=device, dtype=torch.int64)).view(1, 1, 1, 1, key_len)
    value_c = value.to(compute_dtype).unsqueeze(2)  # converted once, shared by all chunks and all g query heads

    for start in range(0, query_len, rows_per_chunk) if num_kept > 0 else ():
        stop = min(start + rows_per_chunk, query_len)
        # ±1 products summed in float32 are exact integers (|Sb| <= d <= 2**24)
        scores = torch.matmul(unit_q[:, :, :, start:stop], unit_k.unsqueeze(2).transpose(-1, -2)).to(torch.int64)
        valid = valid_mask[:, :, :, start:stop]
        rank = torch.where(valid, (scores + dim) * key_len + tie_break, -1)
        kept_idx = rank.topk(num_kept, dim=-1).indices  # (B, Hkv, g, rows, N)
        kept_valid = valid.gather(-1, kept_idx)  # invalid keys rank last: they fill in only where too few are valid
        kept_scores = scores.gather(-1, kept_idx).to(compute_dtype)
        logits = (alpha * kept_scores).masked_fill(~kept_valid, float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0) * kept_valid  # all -inf (no valid key): zeros
        # a dense (rows x n) weight matrix costs less memory than gathering N value rows per query (N * dv > n)
        dense = torch.zeros(scores.shape, dtype=compute_dtype, device=device).scatter_(-1, kept_idx, weights)
        output[:, :, :, start:stop] = torch.matmul(dense, value_c).to(value.dtype)
        if keep_all is not None:
            keep_all[:, :, :, start:stop].scatter_(-1, kept_idx, kept_valid)

    output = output.view(batch, num_heads, query_len, value.shape[-1])  # (not -1: a batch of 0 has 0 elements)
    if return_keep:
        return output, keep_all.view(batch, num_heads, query_len, key_len)
    return output
