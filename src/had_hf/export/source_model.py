"""The model an export starts from: loaded from a path or Hub id with its tokenizer or processor, and checked to be a
calibrated HAD model in its inference stage; a float32 CPU copy when needed, and the export's N rule."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel

from ..config import HADConfig
from ..integration import UnsupportedModelError, check_supported
from ..modes import HAD
from ..state import runtime_state
from .errors import HADExportError

logger = logging.getLogger(__name__)


def load_source_model(model_or_path: Any, processor: Any) -> tuple[PreTrainedModel, Any, str]:
    """The model (and its tokenizer or processor when loading from a path), and a description of the source."""
    if isinstance(model_or_path, PreTrainedModel):
        return model_or_path, processor, f"in-memory {type(model_or_path).__name__}"
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise HADExportError(
            f"export_had expects a transformers PreTrainedModel or a checkpoint path / Hub id, got "
            f"{type(model_or_path).__name__}."
        )
    import transformers
    from transformers import AutoConfig, AutoModel

    source = str(model_or_path)
    config = AutoConfig.from_pretrained(source)
    quantization = getattr(config, "quantization_config", None)
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    if method != "had":
        raise HADExportError(
            f"{source} is not a HAD checkpoint: its config has no HADConfig (quantization_config with quant_method "
            "'had'). Convert the model with `had_hf.convert(model, HADConfig(...))`, calibrate and distill it, and "
            "save it with `save_pretrained` before exporting."
        )
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    try:
        model = (model_class or AutoModel).from_pretrained(source, dtype=torch.float32)
    except UnsupportedModelError as error:
        raise HADExportError(f"{source} cannot run HAD attention: {error}") from error
    return model, processor if processor is not None else _load_processor(source), source


# Files that mark a processor (multimodal), a tokenizer, or an image/feature processor in a checkpoint
_PROCESSOR_FILES = (
    ("processor_config.json", "AutoProcessor"),
    ("tokenizer_config.json", "AutoTokenizer"),
    ("tokenizer.json", "AutoTokenizer"),
    ("preprocessor_config.json", "AutoProcessor"),
)


def _load_processor(source: str) -> Any:
    """The checkpoint's processor, tokenizer or image processor, whichever it ships (None if none).

    Only components whose files exist are loaded: transformers would otherwise build an empty tokenizer from the
    model config alone, and the export would ship it as if it were the model's.
    """
    import transformers
    from transformers.utils import cached_file

    for filename, auto_class in _PROCESSOR_FILES:
        try:
            found = cached_file(
                source,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError:
            found = None
        if found is not None:
            return getattr(transformers, auto_class).from_pretrained(source)
    logger.info("%s has no tokenizer or processor; exporting the model alone", source)
    return None


def check_had_model(model: Any) -> HADConfig:
    """The model's HADConfig, after checking that it is a calibrated HAD model in the inference stage."""
    if not isinstance(model, PreTrainedModel):
        raise HADExportError(f"export_had expects a transformers PreTrainedModel, got {type(model).__name__}.")
    had_config = getattr(model.config, "quantization_config", None)
    if not isinstance(had_config, HADConfig):
        raise HADExportError(
            f"{type(model).__name__} is not a HAD model: its config has no HADConfig. Convert it with "
            "`had_hf.convert(model, HADConfig(...))` and calibrate it with `had_hf.calibrate` first."
        )
    try:
        check_supported(model)
    except UnsupportedModelError as error:
        raise HADExportError(f"{type(model).__name__} is not HAD-capable: {error}") from error
    implementation = model.config._attn_implementation
    if implementation != HAD.name:
        raise HADExportError(
            f"{type(model).__name__} uses attention {implementation!r}, not {HAD.name!r} (was `had_hf.revert` "
            "called?). Export needs the model with HAD attention."
        )
    stage = runtime_state(model).stage
    if stage in ("tanh", "sign"):
        raise HADExportError(
            f"The model is in training stage {stage!r}, whose attention is not binary; export needs the binary "
            "attention of the inference stage: `had_hf.set_stage(model, 'inference')` once distillation is done."
        )
    if not had_config.is_calibrated:
        raise HADExportError(f"{_NOT_CALIBRATED} (the HADConfig has no sigma_q / sigma_k at all).")
    if had_config.has_per_head_sigma:
        raise HADExportError(
            "The model has one sigma per head (HADConfig.sigma_per_head); the exporter, its ONNX graph and the CAM "
            "datapath take one sigma_q and one sigma_k per layer. Distill with per-layer sigma to export."
        )
    return had_config


_NOT_CALIBRATED = (
    "The model is not calibrated: run `had_hf.calibrate(model, dataloader)` (and distill) before exporting, so "
    "that every attention layer has its sigma_q and sigma_k"
)


def check_every_layer_calibrated(model: PreTrainedModel, had_config: HADConfig, sample: dict) -> None:
    """Fails unless every layer that runs HAD attention has both sigmas (an uncalibrated layer would use 1.0)."""
    layers = {}
    for module in model.modules():
        if getattr(module, "_had_config", None) is not None and had_config.binarizes(module._had_is_cross):
            layers[module._had_name] = (module._had_name, *module._had_aliases)
    if not layers:
        raise HADExportError(f"{type(model).__name__} has no attention layer that HAD binarizes.")
    tables = (had_config.sigma_q or {}, had_config.sigma_k or {})
    missing = [name for name, names in layers.items() if not all(any(n in t for n in names) for t in tables)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise HADExportError(f"{_NOT_CALIBRATED}; missing for {len(missing)} of {len(layers)} layers: {shown}.")


def as_float32_cpu(model: PreTrainedModel) -> PreTrainedModel:
    """The model in float32 on CPU: a copy if it is elsewhere, so that the caller's model is not moved or cast."""
    parameter = next(model.parameters(), None)
    if parameter is not None and (parameter.dtype != torch.float32 or parameter.device.type != "cpu"):
        logger.info("Exporting a float32 CPU copy of the model (it is %s on %s)", parameter.dtype, parameter.device)
        model = copy.deepcopy(model).to("cpu", torch.float32)
    return model


@contextmanager
def top_n_rule(had_config: HADConfig, top_n: int | None) -> Iterator[None]:
    """Temporarily sets a fixed N on the (shared) HADConfig, restoring the model's own rule afterwards."""
    if top_n is None:
        yield
        return
    saved = had_config.top_n, had_config.top_n_ratio
    had_config.top_n, had_config.top_n_ratio = top_n, None
    try:
        yield
    finally:
        had_config.top_n, had_config.top_n_ratio = saved
