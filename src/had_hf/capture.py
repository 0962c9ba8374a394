"""A store that the attention functions fill during one forward pass, passed as the forward kwarg `had_store`.

transformers forwards unknown keyword arguments of a model's `forward` down to the attention function, so a store
passed as `model(**batch, had_store=store)` reaches every attention layer without forking model code. Entries are
keyed by the attention module's name: a layer that runs twice in one step (gradient checkpointing recomputes it in
the backward pass) overwrites its entry instead of adding a second one.
"""

from __future__ import annotations

import torch

STORE_KWARG = "had_store"


class HADCaptureStore:
    """Per-layer tensors collected inside the attention functions.

    Args:
        capture_logits (`bool`, *optional*, defaults to `True`):
            Record, per layer, the dense logits each side's softmax sees (`s * Q~ K~^T + bias`, before top-N) and
            the boolean mask of valid keys: what the attention-map distillation loss of METHOD.md section 4 needs.
        capture_qk_std (`bool`, *optional*, defaults to `False`):
            Record the standard deviation of the raw queries and keys (calibration, METHOD.md section 3).
        qk_std_per_head (`bool`, *optional*, defaults to `False`):
            With `capture_qk_std`, record one standard deviation per head (lists) instead of one per layer.
        capture_details (`bool`, *optional*, defaults to `False`):
            Record the binarized queries and keys (±1 int8), the kept-key mask, the attention weights and the
            attention output per layer (golden vectors for the exporter).

    A plain class, not a dataclass: FSDP2 casts the forward kwargs of every sharded module under mixed precision
    (`torch.distributed.utils._apply_to_tensors`), which rebuilds dataclasses and dicts, so a dataclass store would
    be replaced by a copy before the attention functions fill it.
    """

    def __init__(
        self,
        capture_logits: bool = True,
        capture_qk_std: bool = False,
        capture_details: bool = False,
        qk_std_per_head: bool = False,
    ):
        self.capture_logits = capture_logits
        self.capture_qk_std = capture_qk_std
        self.capture_details = capture_details
        self.qk_std_per_head = qk_std_per_head
        self.logits: dict[str, torch.Tensor] = {}
        self.valid: dict[str, torch.Tensor] = {}
        self.qk_std: dict[str, tuple[float, float]] = {}
        self.details: dict[str, dict[str, torch.Tensor]] = {}

    def clear(self) -> None:
        self.logits.clear()
        self.valid.clear()
        self.qk_std.clear()
        self.details.clear()

    def record_qk(self, name: str, query: torch.Tensor, key: torch.Tensor) -> None:
        if self.capture_qk_std:
            with torch.no_grad():
                if self.qk_std_per_head:
                    # (B, H, T, d): one std per head, over batch, positions and dimensions
                    self.qk_std[name] = tuple(
                        x.float().transpose(0, 1).reshape(x.shape[1], -1).std(dim=1).tolist() for x in (query, key)
                    )
                else:
                    self.qk_std[name] = (query.float().std().item(), key.float().std().item())

    def record_logits(self, name: str, logits: torch.Tensor, valid: torch.Tensor) -> None:
        if self.capture_logits:
            self.logits[name] = logits
            self.valid[name] = valid

    def record_details(self, name: str, **tensors: torch.Tensor) -> None:
        if self.capture_details:
            self.details[name] = {key: value.detach() for key, value in tensors.items()}


def forward_inputs(model: torch.nn.Module, inputs: dict) -> dict:
    """A batch's model inputs without `labels`: distillation's targets are the teacher's outputs, and a model given
    labels would also compute its own loss.

    An encoder-decoder model builds its decoder inputs from the labels, so they are built here first (the labels
    shifted right, `prepare_decoder_input_ids_from_labels`), with a decoder mask of the labelled positions.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    model = getattr(model, "module", model)  # DistributedDataParallel
    config = getattr(model, "config", None)
    needs_decoder_inputs = "decoder_input_ids" not in inputs and "decoder_inputs_embeds" not in inputs
    if labels is not None and getattr(config, "is_encoder_decoder", False) and needs_decoder_inputs:
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            raise ValueError(
                f"{type(model).__name__} is an encoder-decoder model without `prepare_decoder_input_ids_from_labels`: "
                "give the batches `decoder_input_ids` (and `decoder_attention_mask`)."
            )
        inputs["decoder_input_ids"] = prepare(labels=labels)
        inputs.setdefault("decoder_attention_mask", (labels != -100).long())
    return inputs
