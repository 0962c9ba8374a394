"""The registry of had_hf's attention modes: each is an `attn_implementation` name transformers can select.

A mode is an entry, not a copy of the attention function: every mode runs `had_hf.attention.had_attention`, and the
entry says which logits it computes, whether it keeps only the top N, and what it records. `register_attention_mode`
adds a mode and registers it (with had_hf's boolean mask function) with transformers; `import had_hf` registers the
built-in ones.

| name | logits | top-N | use |
|---|---|---|---|
| `hamming_topk` | the runtime stage's (`had_hf.state`) | yes | HAD models: training stages and inference |
| `had_eager` | dense | no | the teacher of distillation and calibration (records logits) |
| `had_dense_topn` | dense | yes | exact top-N of the dense logits: what sparsity alone costs |
| `hamming_topk_golden` | binary | yes | golden vectors (records signs, kept keys, weights, values) |
| `hamming_topk_onnx` | binary | yes | ONNX export (traceable; A.V gathers the N kept value rows) |
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import boolean_mask_function, had_attention


@dataclass(frozen=True)
class AttentionMode:
    """One attention mode of had_hf.

    Args:
        name (`str`): the `attn_implementation` name.
        scores (`str`): `"had"` (the transform of the model's runtime stage), `"binary"` (the inference stage's exact
            binary scores, whatever the runtime stage) or `"dense"` (standard logits `s * Q K^T`).
        top_n (`bool`, *optional*, defaults to `True`): keep only the top N logits of each query in the HAD layers.
        record_details (`bool`, *optional*, defaults to `False`): record signs, kept keys, weights and values in the
            capture store (golden vectors).
        gather_values (`bool`, *optional*, defaults to `False`): compute A.V by gathering the N kept value rows, in
            operations that trace to ONNX (and never through the custom op).
    """

    name: str
    scores: str
    top_n: bool = True
    record_details: bool = False
    gather_values: bool = False

    def __post_init__(self):
        if self.scores not in ("had", "binary", "dense"):
            raise ValueError(f"AttentionMode.scores must be 'had', 'binary' or 'dense', got {self.scores!r}.")


HAD = AttentionMode("hamming_topk", scores="had")
DENSE_CAPTURE = AttentionMode("had_eager", scores="dense", top_n=False)
DENSE_TOP_N = AttentionMode("had_dense_topn", scores="dense")
GOLDEN = AttentionMode("hamming_topk_golden", scores="binary", record_details=True)
ONNX = AttentionMode("hamming_topk_onnx", scores="binary", gather_values=True)

ATTENTION_MODES: dict[str, AttentionMode] = {}
_FUNCTIONS: dict[str, functools.partial] = {}


def register_attention_mode(mode: AttentionMode) -> AttentionMode:
    """Adds `mode` to the registry and registers it with transformers (idempotent for the same entry)."""
    known = ATTENTION_MODES.get(mode.name)
    if known is not None and known != mode:
        raise ValueError(f"Attention mode {mode.name!r} is already registered as {known}.")
    ATTENTION_MODES[mode.name] = mode
    function = _FUNCTIONS.setdefault(mode.name, functools.partial(had_attention, mode=mode))
    AttentionInterface.register(mode.name, function)
    AttentionMaskInterface.register(mode.name, boolean_mask_function)
    return mode


def register_builtin_modes() -> None:
    for mode in (HAD, DENSE_CAPTURE, DENSE_TOP_N, GOLDEN, ONNX):
        register_attention_mode(mode)
