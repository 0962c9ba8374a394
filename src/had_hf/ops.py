"""`had::hamming_topk_attention`: HAD attention of the binary stage as one PyTorch custom op.

The op is what inference runs (`hamming_topk` in the `inference` stage, packed-key caches). It has a PyTorch
implementation for every device (`had_hf.kernels.reference`), the Triton kernels for CUDA where they serve the call
(`had_hf.kernels.triton_kernel_for`), and a fake implementation, so `torch.compile(fullgraph=True)` traces a HAD model
as one graph with the op as a single node: no graph break, no host synchronization in the traced code.

Training stages do not use the op: they need gradients, and run the differentiable PyTorch attention of
`had_hf.attention` with the same selection rule (`had_hf.selection`).
"""

from __future__ import annotations

import torch

from .kernels import reference_hamming_topk_attention, triton_kernel_for

OP_NAME = "had::hamming_topk_attention"


@torch.library.custom_op(OP_NAME, mutates_args=())
def hamming_topk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    bias: torch.Tensor | None,
    is_causal: bool,
    top_n: int | None,
    top_n_ratio: float | None,
    alpha: float,
    sink_keys: int = 0,
) -> torch.Tensor:
    """HAD attention of the binary stage: exact top-N of `alpha * Qb Kb^T + bias`, softmax over the kept keys, A.V.

    Args:
        query (`torch.Tensor`): (B, Hq, q, d) floating queries; only their signs are used.
        key (`torch.Tensor`): (B, Hkv, n, d) floating keys, or their packed signs (B, Hkv, n, d // 32) int32 (int64
            words of 64 dimensions also accepted). Hq must be a multiple of Hkv (grouped-query attention).
        value (`torch.Tensor`): (B, Hkv, n, dv).
        mask (`torch.Tensor`, *optional*): bool, broadcastable to (B, Hq, q, n); True marks keys a query may attend to.
        bias (`torch.Tensor`, *optional*): additive logits broadcastable to (B, Hq, q, n) (T5's position bias, a float
            mask's bias); selection and softmax act on the biased logits.
        is_causal (`bool`): also mask keys after each query, the queries being the last q of the n positions.
        top_n (`int`, *optional*), top_n_ratio (`float`, *optional*): the rule for N, exactly one of them (see
            `had_hf.selection.kept_counts`).
        alpha (`float`): sigma_q * sigma_k * scaling (> 0), the scale of the binary scores.
        sink_keys (`int`, *optional*, defaults to 0): each row also keeps its first `sink_keys` valid keys (attention
            sinks).

    Returns:
        `torch.Tensor`: (B, Hq, q, dv) in the dtype of `value`; zeros for a query with no valid key.
    """
    return reference_hamming_topk_attention(
        query, key, value, mask, top_n, alpha, top_n_ratio=top_n_ratio, bias=bias, is_causal=is_causal,
        sink_keys=sink_keys,
    )  # fmt: skip


@hamming_topk_attention.register_kernel("cuda")
def _hamming_topk_attention_cuda(query, key, value, mask, bias, is_causal, top_n, top_n_ratio, alpha, sink_keys=0):
    kernel = triton_kernel_for(query, key, value, mask, bias, sink_keys, alpha)
    if kernel is None:
        return reference_hamming_topk_attention(
            query, key, value, mask, top_n, alpha, top_n_ratio=top_n_ratio, bias=bias, is_causal=is_causal,
            sink_keys=sink_keys,
        )  # fmt: skip
    return kernel(query, key, value, mask, is_causal, top_n, top_n_ratio, alpha, sink_keys)


@hamming_topk_attention.register_fake
def _hamming_topk_attention_fake(query, key, value, mask, bias, is_causal, top_n, top_n_ratio, alpha, sink_keys=0):
    batch, num_heads, query_len, _ = query.shape
    return value.new_empty(batch, num_heads, query_len, value.shape[-1])
