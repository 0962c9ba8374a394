"""Which attention modules HAD replaces: a table per model type, overridable by `HADConfig.target_modules`.

transformers selects one attention function for a whole model, so every module that calls the attention interface
calls HAD's. The table says which of them are HAD attention (self- and cross-attention, by module name); any other
module that calls it runs standard softmax attention. A model type missing from the table needs
`HADConfig(target_modules=[...])`.

Module names are recorded relative to the base model (`bert.encoder.layer.0.attention.self` of a
`BertForSequenceClassification` is `encoder.layer.0.attention.self`, as in `BertModel`), so that per-layer settings
such as calibrated sigmas apply whichever head class loads the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_BERT_LIKE = {"self": r"attention\.self", "cross": r"crossattention\.self", "projections": ["query", "key"]}
# ViT's projections are `query`/`key` in transformers 5.17 and `q_proj`/`k_proj` in later 5.x (peft wraps those present)
_VIT_LIKE = {"self": r"layers?\.\d+\.attention(?:\.attention)?", "projections": ["query", "key", "q_proj", "k_proj"]}
_T5_LIKE = {"self": r"SelfAttention", "cross": r"EncDecAttention", "projections": ["q", "k"]}
_BART_LIKE = {"self": r"self_attn", "cross": r"encoder_attn", "projections": ["q_proj", "k_proj"]}
_DECODER_LIKE = {"self": r"self_attn", "projections": ["q_proj", "k_proj"]}

TARGET_MODULES: dict[str, dict] = {
    **dict.fromkeys(
        ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text", "megatron-bert"),
        _BERT_LIKE,
    ),
    **dict.fromkeys(("vit", "deit", "dinov2", "vit_mae", "vit_msn"), _VIT_LIKE),
    **dict.fromkeys(("t5", "mt5"), _T5_LIKE),
    **dict.fromkeys(("bart", "mbart", "marian", "pegasus", "m2m_100", "whisper"), _BART_LIKE),
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
            "starcoder2",
            "opt",
        ),
        _DECODER_LIKE,
    ),  # fmt: skip
    # GPT-2 projects queries, keys and values with one fused layer
    "gpt2": {"self": r"attn", "cross": r"crossattention", "projections": ["c_attn"]},
    "distilbert": {"self": r"layer\.\d+\.attention", "projections": ["q_lin", "k_lin"]},
}
"""Per `config.model_type`: regular expressions matching the end of a module name (after a dot or at the start),
for its self-attention (`"self"`) and cross-attention (`"cross"`) modules, and the names of its query and key
projections (`"projections"`, what a LoRA adapter of `had_hf.peft_student` targets by default)."""


@dataclass(frozen=True)
class AttentionTarget:
    """An attention module that HAD replaces: its name relative to the base model, and whether it is cross-attention."""

    name: str
    is_cross: bool


def _matches(pattern: str, name: str) -> bool:
    return re.search(rf"(?:^|\.)(?:{pattern})$", name) is not None


def _patterns(model: torch.nn.Module, target_modules: list[str] | None) -> dict[str, str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = TARGET_MODULES.get(model_type)
    if target_modules is not None:
        # the user's patterns choose the modules; the table (where known) still says which are cross-attention
        return {"self": "|".join(f"(?:{p})" for p in target_modules), "cross": (known or {}).get("cross", "(?!)")}
    if known is None:
        raise ValueError(
            f"had_hf has no table of attention modules for model type {model_type!r}. Name them with "
            "HADConfig(target_modules=[...]) (regular expressions matching the end of the modules' names, e.g. "
            f"['self_attn']); known model types: {sorted(TARGET_MODULES)}."
        )
    return {"self": known["self"], "cross": known.get("cross", "(?!)")}


def canonical_name(model: torch.nn.Module, name: str) -> str:
    """`name` relative to the base model: without the head model's `base_model_prefix` (e.g. `bert.`)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + ".") and isinstance(getattr(model, prefix, None), torch.nn.Module):
        return name[len(prefix) + 1 :]
    return name


def find_targets(model: torch.nn.Module, target_modules: list[str] | None = None) -> dict[str, AttentionTarget]:
    """The attention modules HAD replaces in `model`, keyed by their name in `model`.

    A module matched by the patterns that contains another matched module is not a target (the one that calls the
    attention interface is the innermost, e.g. ViT's `attention.attention` where a version nests two).

    Raises:
        `ValueError`: no table entry for the model type and no `target_modules`, or no module matched.
    """
    patterns = _patterns(model, target_modules)
    matched = {}
    for name, _ in model.named_modules():
        if _matches(patterns["cross"], name):
            matched[name] = True
        elif _matches(patterns["self"], name):
            matched[name] = False
    innermost = {name: cross for name, cross in matched.items() if not any(o.startswith(name + ".") for o in matched)}
    if not innermost:
        raise ValueError(
            f"No module of {type(model).__name__} matches the HAD target patterns {patterns}: set "
            "HADConfig(target_modules=[...]) to the names of its attention modules."
        )
    return {name: AttentionTarget(canonical_name(model, name), is_cross) for name, is_cross in innermost.items()}
