"""Dense attention restricted to the exact top-N of its own logits: the reference that separates sparsity from
binarization.

A HAD student differs from its dense teacher in two ways: its logits come from binarized queries and keys, and only
the N largest logits of a row enter the softmax. `topn_dense_reference` evaluates the DENSE model with the second
change alone (top-N of the exact logits QK^T * scaling), so that what sparsity costs can be measured apart from what
binarization costs.

It is the attention function `"had_dense_topn"` registered with transformers' `AttentionInterface`, with a mask
function that always materializes a boolean mask (a top-N selection cannot use sdpa's `is_causal` shortcut).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

DENSE_TOPN_NAME = "had_dense_topn"
SETTING_ATTRIBUTE = "_had_dense_topn"

# Rows of queries processed at once: bounds the (batch, heads, rows, keys) logits held in memory at long context.
QUERY_CHUNK = 1024


@dataclass(frozen=True)
class TopNSetting:
    """How many keys each query keeps: exactly one of a fixed `top_n` and a `top_n_ratio` of its valid keys."""

    top_n: int | None = None
    top_n_ratio: float | None = None

    def __post_init__(self):
        if (self.top_n is None) == (self.top_n_ratio is None):
            raise ValueError(f"Set exactly one of top_n and top_n_ratio, got {self.top_n!r} and {self.top_n_ratio!r}.")
        if self.top_n is not None and (
            isinstance(self.top_n, bool) or not isinstance(self.top_n, int) or self.top_n < 1
        ):
            raise ValueError(f"top_n must be a positive integer, got {self.top_n!r}.")
        if self.top_n_ratio is not None and not (0.0 < float(self.top_n_ratio) <= 1.0):
            raise ValueError(f"top_n_ratio must be a number in (0, 1], got {self.top_n_ratio!r}.")


def select_top_n(
    scores: torch.Tensor, valid: torch.Tensor, top_n: int | None = None, top_n_ratio: float | None = None
) -> torch.Tensor:
    """The keys each query keeps (bool, shaped like `scores`).

    Each row keeps exactly N of its valid keys, N = `min(top_n, valid)` or `ceil(top_n_ratio * valid)` where `valid`
    is the number of keys that row may attend to; among equal scores the lower key index wins. A row without valid
    keys keeps nothing.

    This is the only place the reference selects keys; it has the semantics of `had_hf.selection.select_top_n`.
    """
    valid = valid.expand_as(scores)
    count = valid.sum(dim=-1, keepdim=True)
    if top_n is not None:
        quota = count.clamp(max=top_n)
    else:
        quota = torch.ceil(count.double() * float(top_n_ratio)).long().clamp(max=count)
    masked = scores.masked_fill(~valid, float("-inf"))
    # a stable descending sort keeps equal scores in key-index order, so rank < quota is "lower index wins"
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return (rank < quota) & valid


def _valid_keys_and_bias(attention_mask, query_len, key_len, is_causal, device):
    """(valid: bool broadcastable to (B, H, q, k), additive float bias or None) from any transformers mask."""
    if attention_mask is None:
        valid = torch.ones(1, 1, query_len, key_len, dtype=torch.bool, device=device)
        if is_causal:
            rows = torch.arange(query_len, device=device)[:, None] + (key_len - query_len)
            valid = valid & (torch.arange(key_len, device=device)[None, :] <= rows)
        return valid, None
    attention_mask = attention_mask[..., :key_len]
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    valid = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return valid, torch.where(valid, attention_mask, torch.zeros((), dtype=attention_mask.dtype, device=device))


def _repeat_kv(states: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    """(B, Hkv, k, d) -> (B, Hq, k, d) for grouped-query attention."""
    if states.shape[1] == num_query_heads:
        return states
    return states.repeat_interleave(num_query_heads // states.shape[1], dim=1)


def dense_topn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Softmax attention over the top-N logits of each row: logits = QK^T * scaling (+ mask bias), keep N, @ V.

    The attention function of `"had_dense_topn"`; the module carries its `TopNSetting` (set by
    `topn_dense_reference`). Returns no attention weights: at long context they would be the largest tensor.
    """
    setting = getattr(module, SETTING_ATTRIBUTE, None)
    if setting is None:
        raise ValueError(
            f"Attention {DENSE_TOPN_NAME!r} has no top-N setting on {type(module).__name__}: use it through "
            "`had_hf.evaluation.topn_dense_reference(model, top_n=...)`."
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    num_heads, query_len, key_len = query.shape[1], query.shape[-2], key.shape[-2]
    is_causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    valid, bias = _valid_keys_and_bias(attention_mask, query_len, key_len, is_causal, query.device)
    key = _repeat_kv(key, num_heads)
    value = _repeat_kv(value, num_heads)
    valid = valid.expand(query.shape[0], num_heads, query_len, key_len)
    if bias is not None:
        bias = bias.expand(query.shape[0], num_heads, query_len, key_len)

    outputs = []
    for start in range(0, query_len, QUERY_CHUNK):
        rows = slice(start, min(start + QUERY_CHUNK, query_len))
        logits = torch.matmul(query[:, :, rows], key.transpose(-1, -2)) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if bias is not None:
            logits = logits + bias[:, :, rows]
        keep = select_top_n(logits, valid[:, :, rows], setting.top_n, setting.top_n_ratio)
        weights = torch.softmax(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), dim=-1)
        weights = weights * keep.to(weights.dtype)  # a row that keeps nothing outputs zeros
        outputs.append(torch.matmul(weights.to(value.dtype), value))
    output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return output.transpose(1, 2).contiguous(), None


def boolean_mask_function(*args, **kwargs):
    """Mask interface entry: always a materialized boolean mask (True = attend), never sdpa's skips."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_dense_topn() -> None:
    """Registers `"had_dense_topn"` with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(DENSE_TOPN_NAME, dense_topn_attention_forward)
    AttentionMaskInterface.register(DENSE_TOPN_NAME, boolean_mask_function)


@contextlib.contextmanager
def topn_dense_reference(
    model: PreTrainedModel, top_n: int | None = None, top_n_ratio: float | None = None
) -> Iterator[PreTrainedModel]:
    """Within the block, `model` runs dense attention restricted to the exact top-N logits of each row.

    Args:
        model (`PreTrainedModel`): a dense transformers model whose attention goes through the attention interface.
        top_n (`int`, *optional*): keys kept per query (clamped to the keys it may attend to).
        top_n_ratio (`float`, *optional*): keep `ceil(top_n_ratio * valid keys)` per query instead (e.g. 15/128).

    Exactly one of `top_n` and `top_n_ratio` is set. On exit the model's previous attention implementation is back.

    Example:
        with topn_dense_reference(model, top_n_ratio=15 / 128):
            result = perplexity(model, windows)
    """
    setting = TopNSetting(top_n=top_n, top_n_ratio=top_n_ratio)
    register_dense_topn()
    previous = model.config._attn_implementation
    modules = list(model.modules())
    for module in modules:
        setattr(module, SETTING_ATTRIBUTE, setting)
    model.set_attn_implementation(DENSE_TOPN_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        for module in modules:
            module.__dict__.pop(SETTING_ATTRIBUTE, None)
