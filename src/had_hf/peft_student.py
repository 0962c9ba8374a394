"""HAD through a LoRA adapter (peft): the student is the frozen base plus an adapter, and so is the teacher.

HAD changes only how queries and keys are compared, so by default the adapter sits on the query and key
projections (`LORA_TARGET_MODULES`, per model type, as peft's own tables). The base model is converted to HAD first
(its attention modules are tagged, `had_hf.integration.attach`), then wrapped by `get_peft_model`. The teacher of the
distillation is the same modules with the adapter disabled and dense attention (`dense_teacher`): no second copy of
the base weights is held.

What an adapter output folder holds (`save_adapter`, or `HADDistillationTrainer.save_model` of a peft student):

- `adapter_config.json`, `adapter_model.safetensors`: peft's adapter, `base_model_name_or_path` naming the base;
- `config.json`: the base model's config with the HADConfig as `quantization_config` (calibrated sigmas, N), as in a
  HAD checkpoint, but no base weights.

Loading:

- `had_hf.load_adapter(base, folder)` (base: a model, dense or HAD, or a path) converts the base with the saved
  HADConfig and attaches the adapter: the HAD model.
- `PeftModel.from_pretrained(base, folder)` gives the HAD model when `base` was loaded with the saved HADConfig
  (`from_pretrained(base_path, quantization_config=adapter_had_config(folder))`) or converted with it.
- `AutoModelFor...from_pretrained(folder)` fails loudly (transformers takes a folder with a `config.json` for a full
  checkpoint and finds no base weights in it) instead of silently loading the base with dense attention.
- `PeftModel.from_pretrained(dense_base, folder)` cannot be seen by had_hf (peft runs none of its code): it gives
  the dense base plus the adapter. Use `load_adapter`.
- `merge_and_unload()` of the loaded model is a plain HAD model; `save_pretrained` of it is a HAD checkpoint.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from .config import HADConfig
from .integration import QUANT_METHOD, _saved_had_config, convert, set_attention
from .modes import DENSE_CAPTURE
from .targets import TARGET_MODULES

LORA_TARGET_MODULES: dict[str, list[str]] = {
    model_type: family["projections"] for model_type, family in TARGET_MODULES.items()
}
"""Per `config.model_type`: the query and key projections that the LoRA adapter targets by default (from
`had_hf.targets.TARGET_MODULES`)."""


@functools.cache
def is_peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def _require_peft() -> None:
    if not is_peft_available():
        raise ImportError("HAD through LoRA adapters needs peft: `pip install 'had-hf[peft]'` (peft>=0.17).")


def is_peft_model(model: torch.nn.Module) -> bool:
    if not is_peft_available():
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """The query and key projections of `model`'s family (`LORA_TARGET_MODULES`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LORA_TARGET_MODULES:
        raise ValueError(
            f"had_hf has no default LoRA targets for model type {model_type!r}: pass lora_target_modules (the names "
            f"of its query and key projections). Known model types: {sorted(LORA_TARGET_MODULES)}."
        )
    return list(LORA_TARGET_MODULES[model_type])


def make_peft_student(
    model: PreTrainedModel,
    had_config: HADConfig | None = None,
    *,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] | None = None,
    lora_config=None,
):
    """Converts `model` to HAD (in place) and wraps it with a LoRA adapter: the student of a LoRA distillation.

    `model` is also the teacher (the trainer disables the adapter for it), so do not copy it. Only the adapter is
    trainable; the base weights stay frozen.

    Args:
        model (`PreTrainedModel`): the dense (task-trained) model, or a HAD model.
        had_config (`HADConfig`, *optional*): the HAD settings; defaults to the model's own, else `HADConfig()`.
        lora_r, lora_alpha, lora_dropout: the LoRA rank, scale and dropout (trl's flag names and defaults).
        lora_target_modules (`list[str]`, *optional*): the modules the adapter wraps; defaults to the family's query
            and key projections (`LORA_TARGET_MODULES`).
        lora_config (`peft.LoraConfig`, *optional*): a full peft config instead of the four `lora_*` arguments.

    Returns:
        `peft.PeftModel`: the HAD student.
    """
    _require_peft()
    from peft import LoraConfig, get_peft_model

    if is_peft_model(model):
        raise TypeError("make_peft_student expects the base model; a PeftModel can be given to the trainer as is.")
    if had_config is not None or _saved_had_config(model) is None:
        convert(model, had_config)
    if lora_config is None:
        lora_config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=list(lora_target_modules or default_lora_targets(model)),
        )
    return get_peft_model(model, lora_config)


def convert_peft_student(model, had_config: HADConfig | None) -> HADConfig:
    """Makes the base of a user-built PeftModel a HAD model (with `had_config` if it is not one yet)."""
    base = model.get_base_model()
    saved = _saved_had_config(base)
    if saved is None:
        if had_config is None:
            raise ValueError(
                "The student's base is not a HAD model: pass `had_config=HADConfig(...)` or build the student with "
                "`had_hf.peft_student.make_peft_student`."
            )
        convert(base, had_config)
    elif had_config is not None and had_config is not saved:
        convert(base, had_config)
    return base.config.quantization_config


@contextmanager
def dense_teacher(model):
    """The teacher view of a peft student: adapter disabled, dense capture attention (`had_eager`), eval mode.

    The attention modules are the student's, so their tags (layer names) are the same in both passes; the dense mode
    ignores the runtime stage. Restores the student's attention and train/eval mode afterwards.
    """
    base = model.get_base_model()
    implementation, was_training = base.config._attn_implementation, model.training
    with model.disable_adapter():
        set_attention(base, DENSE_CAPTURE.name)
        model.eval()
        try:
            yield model
        finally:
            set_attention(base, implementation)
            model.train(was_training)


def save_adapter(model, output_dir: str, **kwargs) -> None:
    """`model.save_pretrained(output_dir)` plus the base's `config.json` holding the HADConfig (module docstring)."""
    model.save_pretrained(output_dir, **kwargs)
    write_had_config(model, output_dir)


def write_had_config(model, output_dir: str) -> None:
    """Writes the base model's config (with its HADConfig) as `config.json` beside a saved adapter."""
    base = model.get_base_model()
    if _saved_had_config(base) is None:
        raise ValueError("The adapter's base is not a HAD model: nothing to save as its HADConfig.")
    base.config.architectures = [type(base).__name__]  # as `save_pretrained` records it: the class to load
    base.config.save_pretrained(output_dir)


def _saved_config(adapter_dir: str) -> dict:
    """The `config.json` beside an adapter, in a local folder or a Hub repo."""
    path = os.path.join(adapter_dir, "config.json")
    if not os.path.isdir(adapter_dir):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(str(adapter_dir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{adapter_dir} has no config.json with a HADConfig: it is not a HAD adapter folder (save the adapter "
            "with `had_hf.peft_student.save_adapter` or `HADDistillationTrainer.save_model`)."
        )
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def adapter_had_config(adapter_dir: str) -> HADConfig:
    """The HADConfig saved beside an adapter (its `config.json`'s `quantization_config`)."""
    saved = _saved_config(adapter_dir).get("quantization_config")
    if not isinstance(saved, dict) or saved.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"{adapter_dir}/config.json holds no HADConfig (a quantization_config with quant_method 'had')."
        )
    return HADConfig.from_dict(saved)


def load_adapter(base_model: PreTrainedModel | str, adapter_dir: str, model_class=None, **kwargs):
    """Loads a HAD adapter: the base converted with the saved HADConfig, plus the adapter. Always HAD attention.

    Args:
        base_model (`PreTrainedModel` or `str`): the base model (dense or HAD; converted in place), or its path.
        adapter_dir (`str`): a folder saved by `save_adapter` / the trainer, or its Hub repo id.
        model_class (*optional*): the class that loads a base given by path; defaults to the architecture in the
            saved config (e.g. `BertForSequenceClassification`).
        **kwargs: passed to `PeftModel.from_pretrained` (e.g. `is_trainable=True`).

    Returns:
        `peft.PeftModel`: the HAD model with its adapter; `.merge_and_unload()` gives a plain HAD model.
    """
    _require_peft()
    import transformers
    from peft import PeftModel

    had_config = adapter_had_config(adapter_dir)
    if isinstance(base_model, (str, os.PathLike)):
        if model_class is None:
            architectures = _saved_config(adapter_dir).get("architectures") or ["AutoModel"]
            model_class = getattr(transformers, architectures[0])
        base_model = model_class.from_pretrained(base_model, quantization_config=had_config)
    else:
        convert(base_model, had_config)
    return PeftModel.from_pretrained(base_model, adapter_dir, **kwargs)
