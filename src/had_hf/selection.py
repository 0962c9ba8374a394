"""The top-N rule of METHOD.md section 1, written once: which keys a query keeps.

Per query row: N is `top_n`, or `ceil(top_n_ratio * v)` (at least 1) where v is the number of keys that row may
attend to (padding, causal future positions and unfilled cache slots do not count), and never more than v. The row
keeps the N keys with the largest logits; among keys whose logit equals the N-th largest (the threshold), the lower
key indices are kept first. Masked keys are never kept; a row with no valid key keeps nothing.

Attention sinks (`sink_keys = k`, 0 by default: the paper's rule): each row also keeps its first k valid keys, whatever
their logits, beside its top N (a row then keeps between N and N + k keys). Decoder LLMs put much of their attention on
the sequence's first key (`benchmarks/README.md`, "What binarization breaks before distillation"); a top N of binary
scores seldom holds it.

Every implementation selects through these functions or is tested against them: the eager attention of every
stage, the `had::hamming_topk_attention` op's PyTorch implementation, the ONNX graph and the golden vectors. The
Triton kernels implement the same rule (histogram threshold, ties filled in index order) and are tested for equal
kept sets. The functions trace under `torch.compile` without graph breaks and under the TorchScript ONNX tracer with
the number of keys as a graph value (no Python int taken from a tensor, no bool cumulative sum).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_top_n_rule(top_n: int | None, top_n_ratio: float | None) -> None:
    """Raises `ValueError` unless exactly one of `top_n` and `top_n_ratio` is given."""
    if (top_n is None) == (top_n_ratio is None):
        raise ValueError(f"Give exactly one of top_n and top_n_ratio, got top_n={top_n}, top_n_ratio={top_n_ratio}.")


def kept_counts(valid_counts: torch.Tensor, top_n: int | None, top_n_ratio: float | None) -> torch.Tensor:
    """N of each row from its number of valid keys: `min(top_n, v)` or `min(max(1, ceil(ratio * v)), v)`.

    This is the rule. The decode kernels count each row's valid keys themselves and apply it in Triton
    (`had_hf.kernels.decode_split_k._kept_count`, the same float64 product and ceil), so that a decode step launches
    nothing but its kernels; tests hold that copy equal to this function.

    Args:
        valid_counts (`torch.Tensor`): integer tensor of per-row valid-key counts v, any shape.
        top_n (`int`, *optional*): a fixed N. Exactly one of `top_n` and `top_n_ratio` is given.
        top_n_ratio (`float`, *optional*): N = ceil(ratio * v), computed in float64.

    Returns:
        `torch.Tensor`: int32 tensor shaped like `valid_counts`.
    """
    check_top_n_rule(top_n, top_n_ratio)
    counts = valid_counts.to(torch.int32)
    if top_n is not None:
        wanted = torch.full_like(counts, top_n)
    else:
        wanted = torch.ceil(counts.to(torch.float64) * top_n_ratio).to(torch.int32).clamp(min=1)
    return torch.minimum(wanted, counts)


def select_top_n(
    scores: torch.Tensor,
    valid: torch.Tensor,
    top_n: int | None = None,
    top_n_ratio: float | None = None,
    sink_keys: int = 0,
) -> torch.Tensor:
    """The keys each query keeps (see the module docstring for the rule).

    Args:
        scores (`torch.Tensor`): (..., k) logits as the softmax sees them (any real values, biases included).
        valid (`torch.Tensor`): bool, broadcastable to `scores`; False keys are never kept.
        top_n (`int`, *optional*), top_n_ratio (`float`, *optional*): the rule for N, exactly one of them.
        sink_keys (`int`, *optional*, defaults to 0): each row also keeps its first `sink_keys` valid keys.

    Returns:
        `torch.Tensor`: bool mask of the kept keys, shaped like `scores`.
    """
    # a mask shared by heads or the batch is counted and inverted at its own size, not once per head
    valid = valid.expand(*valid.shape[:-1], scores.shape[-1])
    num_kept = kept_counts(valid.sum(dim=-1, keepdim=True, dtype=torch.int32), top_n, top_n_ratio)
    masked = scores.masked_fill(~valid, float("-inf"))
    # the threshold is each row's N-th largest logit: the top `most` values, in order, for `most` >= every row's N
    if top_n is not None:
        # a constant TopK over scores padded with N columns of -inf serves any number of keys
        ordered = F.pad(masked, (0, top_n), value=float("-inf")).topk(top_n, dim=-1).values
    elif torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        ordered = masked.sort(dim=-1, descending=True).values  # the number of keys is a graph value: no constant K
    else:
        ordered = masked.topk(most_kept(scores.shape[-1], top_n_ratio), dim=-1).values
    index = (num_kept.to(torch.int64) - 1).clamp(min=0).expand(*scores.shape[:-1], 1)
    threshold = ordered.gather(-1, index)
    above = masked > threshold  # a masked key (-inf) is above no threshold
    tied = (masked == threshold) & valid
    quota = num_kept - above.sum(dim=-1, keepdim=True, dtype=torch.int32)
    keep = above | (tied & (tied.to(torch.int32).cumsum(dim=-1, dtype=torch.int32) <= quota))
    return keep | first_valid_keys(valid, sink_keys) if sink_keys else keep


def kept_slots(num_valid: int, top_n: int | None, top_n_ratio: float | None, sink_keys: int = 0) -> int:
    """The most keys a row with `num_valid` valid keys keeps: its N (`kept_counts`) and its `sink_keys` first keys,
    at most `num_valid` (a sink inside the top N is one key, so a row may keep fewer)."""
    return min(int(kept_counts(torch.tensor(num_valid), top_n, top_n_ratio)) + sink_keys, num_valid)


def first_valid_keys(valid: torch.Tensor, count: int) -> torch.Tensor:
    """bool, shaped like `valid`: each row's first `count` valid keys (the attention sinks of `select_top_n`)."""
    return valid & (valid.to(torch.int32).cumsum(dim=-1, dtype=torch.int32) <= count)


def sink_ends(valid: torch.Tensor, count: int) -> torch.Tensor:
    """int32, shaped like `valid` less its last dimension: where each row's attention sinks end. A row's first `count`
    valid keys (`first_valid_keys`) are its valid keys at indices below this end; the Triton kernels take the sinks
    in this form, one integer per row."""
    return (valid.to(torch.int32).cumsum(dim=-1, dtype=torch.int32) <= count).sum(dim=-1, dtype=torch.int32)


def check_sink_keys(sink_keys) -> None:
    """Raises `ValueError` unless `sink_keys` is an integer >= 0."""
    if isinstance(sink_keys, bool) or not isinstance(sink_keys, int) or sink_keys < 0:
        raise ValueError(f"sink_keys must be an integer >= 0 (0: no attention sinks), got {sink_keys!r}.")


def most_kept(num_keys: int, top_n_ratio: float) -> int:
    """The largest N of the ratio rule in a row of `num_keys` keys: no row keeps more, whatever its valid keys (N is
    `ceil(ratio * v)` for v <= `num_keys` valid keys, computed in float64 as Python floats are)."""
    return min(num_keys, max(1, math.ceil(top_n_ratio * num_keys)))


def kept_indices(keep: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices of each row's kept keys in increasing key order, in `slots` columns.

    Returns `(indices, present)`, both (..., slots) int64 / bool: `indices` is 0 where a slot is empty (rows keeping
    fewer than `slots` keys) and `present` says which slots hold a kept key. Kept keys are ranked by
    `n_keys - index` (distinct, > 0), so one constant TopK lists them in order.
    """
    num_keys = keep.shape[-1]
    positions = torch.arange(num_keys, device=keep.device, dtype=torch.int32)
    rank = keep.to(torch.int32) * (num_keys - positions)
    ranked = F.pad(rank, (0, slots)).topk(slots, dim=-1)
    present = ranked.values > 0
    return torch.where(present, ranked.indices, torch.zeros_like(ranked.indices)), present


def causal_valid(query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
    """(1, 1, q, k) bool: query i (the last q positions of the keys) may attend to keys j <= i + (k - q)."""
    rows = torch.arange(query_len, device=device)[:, None] + (key_len - query_len)
    return (torch.arange(key_len, device=device)[None, :] <= rows)[None, None]
