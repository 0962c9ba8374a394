"""How had_hf plugs into transformers: registration, `convert`, and reloading HAD checkpoints as HAD.

Why a quantizer: transformers does not persist `attn_implementation`, so a HAD checkpoint reloaded with plain
`from_pretrained` would silently come back as dense attention. The HADConfig is therefore saved as the model's
`quantization_config` (`quant_method="had"`), and had_hf registers a quantizer for that method. transformers
hands every checkpoint carrying that config to the quantizer, which switches the model to `hamming_topk` and
attaches the HADConfig before the weights load. The quantizer is only a loading hook: weights stay in full
precision, so once loaded the model is made an ordinary, trainable, castable model again.
"""

from __future__ import annotations

import logging
import re

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from . import attention
from .config import HADConfig

logger = logging.getLogger(__name__)

QUANT_METHOD = "had"
_CROSS_ATTENTION_NAME = re.compile(r"cross|encdec|encoder_attn", re.IGNORECASE)


class UnsupportedModelError(ValueError):
    """The model's attention does not go through transformers' attention interface."""


class HADQuantizer(HfQuantizer):
    """Loading hook for checkpoints whose config carries a HADConfig: switches them to `hamming_topk` attention."""

    requires_calibration = False

    def update_attn_implementation(self, config):  # transformers >= 5.2x calls this before building the model
        requested = getattr(config, "_attn_implementation_internal", None)
        if requested not in (None, attention.ATTENTION_NAME):
            logger.warning(
                "This checkpoint was distilled for HAD attention; loading it with attn_implementation=%r is "
                "overridden to %r. Use `had_hf.revert(model)` after loading for dense attention.",
                requested,
                attention.ATTENTION_NAME,
            )
        return config

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs):
        _switch_to_had(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs):
        # Weights are untouched full-precision tensors: drop the "quantized" markers that would refuse `.half()`,
        # `.float()` and plain fine-tuning, and keep only the HADConfig in the model config.
        model.hf_quantizer = None
        model.is_quantized = False
        for submodule in model.modules():
            if isinstance(submodule, PreTrainedModel):
                submodule.config.__dict__.pop("_is_quantized", None)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def register() -> None:
    """Registers had_hf with transformers. Additive and idempotent: adds entries, never wraps existing ones.

    - `"hamming_topk"`: the HAD attention function, with a boolean mask function.
    - `"had_eager"`: eager softmax attention that records logits (teacher side of distillation, calibration).
    - the quantization config and quantizer for `quant_method="had"` (reloading HAD checkpoints as HAD).
    """
    for name, function in (
        (attention.ATTENTION_NAME, attention.hamming_topk_attention_forward),
        (attention.DENSE_CAPTURE_NAME, attention.dense_capture_attention_forward),
    ):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, attention.boolean_mask_function)
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HADConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = HADConfig
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HADQuantizer:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = HADQuantizer


def check_supported(model: PreTrainedModel) -> None:
    """Raises `UnsupportedModelError` when the model's attention cannot be replaced through the interface."""
    for submodule in model.modules():
        if isinstance(submodule, PreTrainedModel) and not type(submodule)._can_set_attn_implementation():
            raise UnsupportedModelError(
                f"{type(submodule).__name__} does not compute attention through transformers' AttentionInterface, "
                "so HAD attention cannot be installed in it (it would silently stay dense). Supported: models "
                "whose attention calls `ALL_ATTENTION_FUNCTIONS.get_interface(...)`, e.g. BERT, RoBERTa, ViT/DeiT, "
                "T5 and Llama-style decoders."
            )


def attach(model: torch.nn.Module, had_config: HADConfig) -> None:
    """Tags every attention module with its name, whether it is cross-attention, and the shared HADConfig.

    The attention function receives only the module, so these attributes are how it finds its layer's sigma. They
    are plain attributes, so they survive `copy.deepcopy` (the student is a copy of the teacher).
    """
    for name, module in model.named_modules():
        if "Attention" in type(module).__name__ or hasattr(module, "is_causal"):
            module._had_name = name
            module._had_is_cross = bool(_CROSS_ATTENTION_NAME.search(name))
            module._had_config = had_config


def attention_module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if getattr(module, "_had_name", None) == name]


def set_attention(model: PreTrainedModel, name: str) -> None:
    """`model.set_attn_implementation(name)`, passed on to nested models that hold a copy of the config.

    transformers 5.17 (the GPU image's) does not pass the choice on to T5's encoder and decoder stacks, which keep
    copies of the config: their layers would silently stay dense. Later versions do; then this loop changes nothing.
    """
    model.set_attn_implementation(name)
    for submodule in model.modules():
        config = getattr(submodule, "config", None) if isinstance(submodule, PreTrainedModel) else None
        if config is not None and config is not model.config and getattr(config, "_attn_implementation", name) != name:
            config._attn_implementation = name


def _switch_to_had(model: PreTrainedModel, had_config: HADConfig) -> None:
    check_supported(model)
    model.config.quantization_config = had_config
    # Saved into config.json: transformers without had_hf imported then refuses to build the model ("hamming_topk
    # is not supported") instead of loading it as dense attention; with had_hf imported it selects HAD directly.
    model.config.attn_implementation = attention.ATTENTION_NAME
    attach(model, had_config)
    set_attention(model, attention.ATTENTION_NAME)


def convert(model: PreTrainedModel, had_config: HADConfig | None = None) -> PreTrainedModel:
    """Switches a model to HAD attention in place and returns it.

    Args:
        model (`PreTrainedModel`): a transformers model whose attention goes through the attention interface.
        had_config (`HADConfig`, *optional*): defaults to `HADConfig()` (top_n=30, stage="binary", uncalibrated).

    Raises:
        `UnsupportedModelError`: the model's attention does not use the interface (it would silently stay dense).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"convert expects a transformers PreTrainedModel, got {type(model).__name__}.")
    had_config = had_config if had_config is not None else HADConfig()
    if not isinstance(had_config, HADConfig):
        raise TypeError(f"had_config must be a HADConfig, got {type(had_config).__name__}.")
    _switch_to_had(model, had_config)
    _verify_on_first_forward(model)
    return model


def revert(model: PreTrainedModel, attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Removes HAD from a model: dense `attn_implementation`, no HADConfig in its config."""
    model.config.__dict__.pop("quantization_config", None)
    model.config.__dict__.pop("attn_implementation", None)
    for module in model.modules():
        for attribute in ("_had_config", "_had_name", "_had_is_cross"):
            module.__dict__.pop(attribute, None)
    set_attention(model, attn_implementation)
    return model


def use_dense_capture(model: PreTrainedModel) -> PreTrainedModel:
    """Names the attention modules and switches to `had_eager` (dense, records logits): the teacher's setting."""
    check_supported(model)
    attach(model, getattr(model.config, "quantization_config", None) or HADConfig())
    for module in model.modules():
        module.__dict__.pop("_had_config", None)
    set_attention(model, attention.DENSE_CAPTURE_NAME)
    return model


def _verify_on_first_forward(model: PreTrainedModel) -> None:
    """After the first forward, fail loudly if no attention layer called the HAD function."""
    state = {}

    def before(module, args, kwargs):
        state["calls"] = attention.call_count

    def after(module, args, kwargs, output):
        pre_handle.remove()
        post_handle.remove()
        if attention.call_count == state.get("calls", attention.call_count) and _uses_had(module):
            raise UnsupportedModelError(
                f"{type(module).__name__} ran a forward pass with attn_implementation='hamming_topk' without calling "
                "it: its attention does not go through transformers' AttentionInterface, so it stayed dense."
            )

    pre_handle = model.register_forward_pre_hook(before, with_kwargs=True)
    post_handle = model.register_forward_hook(after, with_kwargs=True)


def _uses_had(model: PreTrainedModel) -> bool:
    return getattr(model.config, "_attn_implementation", None) == attention.ATTENTION_NAME
