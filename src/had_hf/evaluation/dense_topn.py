"""Dense attention restricted to the exact top-N of its own logits: the reference that separates sparsity from
binarization.

A HAD student differs from its dense teacher in two ways: its logits come from binarized queries and keys, and only
the N largest logits of a row enter the softmax. `topn_dense_reference` evaluates the DENSE model with the second
change alone (top-N of the exact logits `s * Q K^T`, by the one rule of `had_hf.selection`), so that what sparsity
costs can be measured apart from what binarization costs. It runs the `had_dense_topn` attention mode
(`had_hf.modes.DENSE_TOP_N`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers import PreTrainedModel

from ..config import HADConfig
from ..integration import attach, set_attention
from ..modes import DENSE_TOP_N

DENSE_TOPN_NAME = DENSE_TOP_N.name
_ATTRIBUTES = ("_had_config", "_had_name", "_had_is_cross", "_had_aliases", "_had_dense", "_had_state")


@contextlib.contextmanager
def topn_dense_reference(
    model: PreTrainedModel, top_n: int | None = None, top_n_ratio: float | None = None, sink_keys: int = 0
) -> Iterator[PreTrainedModel]:
    """Within the block, `model` runs dense attention restricted to the exact top-N logits of each row.

    Args:
        model (`PreTrainedModel`): a dense transformers model whose attention goes through the attention interface.
        top_n (`int`, *optional*): keys kept per query (clamped to the keys it may attend to).
        top_n_ratio (`float`, *optional*): keep `ceil(top_n_ratio * valid keys)` per query instead (e.g. 15/128).
        sink_keys (`int`, *optional*, defaults to 0): also keep each query's first `sink_keys` valid keys (the HAD
            model's attention sinks, so that the reference differs from it in the scores alone).

    Exactly one of `top_n` and `top_n_ratio` is set. On exit the model's previous attention and tags are back.

    Example:
        with topn_dense_reference(model, top_n_ratio=15 / 128):
            result = perplexity(model, windows)
    """
    if (top_n is None) == (top_n_ratio is None):
        raise ValueError(f"Set exactly one of top_n and top_n_ratio, got {top_n!r} and {top_n_ratio!r}.")
    config = HADConfig(top_n=top_n, top_n_ratio=top_n_ratio, sink_keys=sink_keys)
    previous = model.config._attn_implementation
    saved = {id(m): {a: m.__dict__[a] for a in _ATTRIBUTES if a in m.__dict__} for m in model.modules()}
    attach(model, config)
    set_attention(model, DENSE_TOPN_NAME)
    try:
        yield model
    finally:
        set_attention(model, previous)
        for module in model.modules():
            for attribute in _ATTRIBUTES:
                module.__dict__.pop(attribute, None)
            module.__dict__.update(saved.get(id(module), {}))
