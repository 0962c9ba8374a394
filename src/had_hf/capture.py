"""A store that the attention functions fill during one forward pass, passed as the forward kwarg `had_store`.

transformers forwards unknown keyword arguments of a model's `forward` down to the attention function, so a store
passed as `model(**batch, had_store=store)` reaches every attention layer without forking model code. Entries are
keyed by the attention module's name: a layer that runs twice in one step (gradient checkpointing recomputes it in
the backward pass) overwrites its entry instead of adding a second one.

Two ways to get the attention-map loss (METHOD.md section 4):

- `capture_logits`: each side keeps every layer's dense (B, H, q, k) logits; `had_hf.losses.attention_kl` compares
  them afterwards. Memory: layers x heads x q x k logits per side.
- `capture_scores` on the teacher's store and `distill_from=teacher_store` on the student's: the teacher keeps only
  each layer's queries and keys (linear in the length), and the student's attention call computes its layer's KL
  right where its logits are made, in chunks of query rows (`had_hf.losses.chunked_attention_kl_terms`), keeping a
  (sum, count) pair per layer. `attention_kl()` gives the loss. This is what the distillation trainer uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .losses import mean_attention_kl

STORE_KWARG = "had_store"
RECORD_ATTRIBUTE = "_had_record"
_SIGMA_TENSORS = "_had_sigma_tensors"


@dataclass
class DenseScores:
    """What a dense layer's logits are made of: `scaling * query @ key^T + position_bias` (the mask's part is the
    student's to add, see `HADCaptureStore`). Queries (B, Hq, q, d) and keys (B, Hkv, k, d) as the attention
    function received them (after rotary embeddings, before grouped-query expansion)."""

    query: torch.Tensor
    key: torch.Tensor
    scaling: float
    position_bias: torch.Tensor | None


class LayerRecord:
    """What one attention layer records in one forward pass for the attention KL: the teacher's `DenseScores`, the
    student's `(KL sum, counted rows)`; and what that layer's KL reads: its (B, T) query mask, the teacher's record of
    the same layer, its sigmas as tensors.

    A store `bind`s one record to each attention module, so that the attention function finds its layer's entries
    through its module, without its name: compiled code (one graph for every decoder block under regional
    compilation) then holds nothing specific to a layer. A plain class (see `HADCaptureStore`).
    """

    def __init__(self, name: str, query_mask: torch.Tensor | None = None, teacher: LayerRecord | None = None):
        self.name = name
        self.query_mask = query_mask
        self.teacher = teacher
        self.sigmas: tuple[torch.Tensor, torch.Tensor] | None = None
        self.scores: DenseScores | None = None
        self.kl_terms: tuple[torch.Tensor, torch.Tensor] | None = None

    def teacher_scores(self) -> DenseScores:
        """The teacher's `DenseScores` of this layer."""
        scores = self.teacher.scores if self.teacher is not None else None
        if scores is None:
            raise ValueError(
                f"The teacher recorded no queries and keys for attention layer {self.name!r}: the student must be a "
                "copy of the teacher, run on the same inputs, and the teacher's store needs capture_scores=True."
            )
        return scores


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
        capture_scores (`bool`, *optional*, defaults to `False`):
            Record, per dense layer, its queries, keys, logit scale and position bias (`DenseScores`): the teacher's
            side of the chunked attention KL, linear in the sequence length.
        distill_from (`HADCaptureStore`, *optional*):
            The teacher's store (filled with `capture_scores` by the same inputs). Each attention layer then computes
            its KL(teacher || student) over its rows as it runs, in chunks of query rows, and records it in
            `kl_terms`; the same valid-key mask and mask bias serve both sides.
        query_mask (`Callable[[str], torch.Tensor | None]`, *optional*):
            With `distill_from`: given a layer name, the (B, T) mask of the real (non-padding) positions of the
            sequence its queries come from, or None to count every row (a mask of another length than the layer's
            queries counts every row too).
        kl_chunk_rows (`int`, *optional*):
            With `distill_from`: query rows per chunk (default: chunks of about `had_hf.losses.KL_CHUNK_ELEMENTS`).

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
        capture_scores: bool = False,
        distill_from: HADCaptureStore | None = None,
        query_mask: Callable[[str], torch.Tensor | None] | None = None,
        kl_chunk_rows: int | None = None,
    ):
        self.capture_logits = capture_logits
        self.capture_qk_std = capture_qk_std
        self.capture_details = capture_details
        self.qk_std_per_head = qk_std_per_head
        self.capture_scores = capture_scores
        self.distill_from = distill_from
        self.query_mask = query_mask
        self.kl_chunk_rows = kl_chunk_rows
        self.logits: dict[str, torch.Tensor] = {}
        self.valid: dict[str, torch.Tensor] = {}
        self.qk_std: dict[str, tuple[float, float]] = {}
        self.details: dict[str, dict[str, torch.Tensor]] = {}
        self.records: dict[str, LayerRecord] = {}

    def clear(self) -> None:
        self.logits.clear()
        self.valid.clear()
        self.qk_std.clear()
        self.details.clear()
        self.records.clear()

    @property
    def scores(self) -> dict[str, DenseScores]:
        """Per layer name, the `DenseScores` recorded with `capture_scores`."""
        return {name: record.scores for name, record in self.records.items() if record.scores is not None}

    @property
    def kl_terms(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer name, the `(KL sum, counted rows)` recorded with `distill_from`."""
        return {name: record.kl_terms for name, record in self.records.items() if record.kl_terms is not None}

    def record(self, name: str) -> LayerRecord:
        """The record of layer `name` in this forward pass (created at its first use)."""
        record = self.records.get(name)
        if record is None:
            query_mask = self.query_mask(name) if self.query_mask is not None else None
            teacher = self.distill_from.record(name) if self.distill_from is not None else None
            record = self.records[name] = LayerRecord(name, query_mask, teacher)
        return record

    @contextmanager
    def bound(self, model: torch.nn.Module | Sequence[torch.nn.Module]) -> Iterator[HADCaptureStore]:
        """Within the context, each attention module of `model` (tagged by `had_hf.convert` or `use_dense_capture`;
        or `model` is the list of them, `bound_modules(model)` found once by a caller that binds at every step)
        carries its layer's record of this store (`LayerRecord`, with its sigmas as tensors on the module's device),
        which the attention function then uses instead of looking its layer up by name. Compiled code holds nothing
        specific to a layer: every decoder block can run one graph (regional compilation). Records that a forward pass
        outside the context makes (gradient checkpointing's recomputation in the backward pass) are found by name, and
        are the same. Inside compiled code a bound store records what distillation reads (the teacher's scores, the KL
        terms); logits, details and query/key statistics are recorded by layer name, by eager code."""
        modules = bound_modules(model) if isinstance(model, torch.nn.Module) else model
        for module in modules:
            record = self.record(module._had_name)
            record.sigmas = _sigma_tensors(module)
            module.__dict__[RECORD_ATTRIBUTE] = record
        try:
            yield self
        finally:
            for module in modules:
                module.__dict__.pop(RECORD_ATTRIBUTE, None)

    def copy_scores(self, buffers: dict | None = None) -> None:
        """Replaces each record's queries, keys and position bias by copies of them. Tensors that a CUDA graph returns
        (`torch.compile` in a CUDA-graph mode) live in memory that the next graph run reuses: the teacher's scores
        must outlive the student's forward, which runs its own graph before the losses read them.

        With `buffers` (a dict the caller keeps from step to step), each copy is written at the start of one flat
        tensor per layer and field, kept there, so that it has the same address at every step (a new one only when a
        larger copy is needed). The student's compiled attention reads the teacher's scores through its module, so
        `torch.compile` takes them as static inputs, and a CUDA graph replays only while those keep their addresses
        (otherwise it is recorded again, at every step)."""

        def copy(name: str, field: str, tensor: torch.Tensor) -> torch.Tensor:
            if buffers is None:
                return tensor.clone()
            return _copy_at_a_kept_address(buffers, (name, field), tensor)

        for name, record in self.records.items():
            scores = record.scores
            if scores is not None:
                bias = scores.position_bias
                record.scores = DenseScores(
                    copy(name, "query", scores.query),
                    copy(name, "key", scores.key),
                    scores.scaling,
                    None if bias is None else copy(name, "position_bias", bias),
                )

    def attention_kl(self) -> torch.Tensor:
        """L_attn: the KL summed over every layer's counted rows, over their number (as `losses.attention_kl`)."""
        missing = sorted(set(self.kl_terms) ^ set(self.distill_from.scores if self.distill_from else ()))
        if missing:
            raise ValueError(
                f"Teacher and student attention layers differ: {missing}. The student must be a copy of the teacher."
            )
        return mean_attention_kl(self.kl_terms)

    def attention_kl_per_layer(self) -> dict[str, float]:
        """Each layer's mean row KL (its KL sum over its counted rows), as numbers."""
        return {name: float(total) / max(int(count), 1) for name, (total, count) in self.kl_terms.items()}

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


def _copy_at_a_kept_address(buffers: dict, key: tuple[str, str], tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` at the start of `buffers[key]`, a flat tensor kept for the next copy (made anew when it is
    too small or of another dtype or device). The copy has the strides that `clone` would give it (the source's, where
    they are dense), so that the kernels reading it round as they would read the source."""
    flat = buffers.get(key)
    if flat is None or flat.numel() < tensor.numel() or (flat.dtype, flat.device) != (tensor.dtype, tensor.device):
        flat = buffers[key] = torch.empty(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    strides = torch.empty_like(tensor, device="meta").stride()
    copied = flat[: tensor.numel()].as_strided(tensor.shape, strides)
    copied.copy_(tensor)
    return copied


def bound_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of `model` that a store binds (`HADCaptureStore.bound`): those that `had_hf.convert` or
    `use_dense_capture` tagged with their layer's name."""
    return [module for module in model.modules() if getattr(module, "_had_name", None) is not None]


def _sigma_tensors(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A HAD module's (sigma_q, sigma_k) as float32 tensors on its device (0-d, or one value per head), what compiled
    attention reads instead of Python numbers (which it would hold as constants of the graph); None for a module that
    does not binarize. Kept on the module while its sigmas and device stay the same."""
    config = getattr(module, "_had_config", None)
    if config is None or not config.binarizes(module._had_is_cross):
        return None
    values = config.sigmas(module._had_name, module._had_aliases)
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    cached = module.__dict__.get(_SIGMA_TENSORS)
    if cached is None or cached[0] != (values, device):
        tensors = tuple(torch.tensor(value, dtype=torch.float32, device=device) for value in values)
        cached = module.__dict__[_SIGMA_TENSORS] = ((values, device), tensors)
    return cached[1]


def forward_inputs(model: torch.nn.Module, inputs: dict) -> dict:
    """A batch's model inputs without `labels`: distillation's targets are the teacher's outputs, and a model given
    labels would also compute its own loss. A generative model is asked for no KV cache.

    An encoder-decoder model builds its decoder inputs from the labels, so they are built here first (the labels
    shifted right, `prepare_decoder_input_ids_from_labels`), with a decoder mask of the labelled positions.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    model = getattr(model, "module", model)  # DistributedDataParallel
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if getattr(config, "use_cache", None) is not None and can_generate is not None and can_generate():
        # one forward pass over whole sequences (the teacher's and the student's, whatever their configs say): a KV
        # cache would only hold every layer's keys and values (and, under regional compilation, its layer index
        # would give each decoder layer a graph of its own)
        inputs.setdefault("use_cache", False)
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
