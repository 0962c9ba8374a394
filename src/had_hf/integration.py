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

import torch
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .attention import CALL_PROBE
from .config import HADConfig
from .modes import DENSE_CAPTURE, HAD, register_builtin_modes
from .state import STATE_ATTRIBUTE, HADRuntimeState, attach_state
from .targets import find_targets

logger = logging.getLogger(__name__)

QUANT_METHOD = "had"
_MODULE_ATTRIBUTES = ("_had_config", "_had_name", "_had_is_cross", "_had_aliases", "_had_dense", STATE_ATTRIBUTE)


class UnsupportedModelError(ValueError):
    """The model's attention does not go through transformers' attention interface."""


class HADQuantizer(HfQuantizer):
    """Loading hook for checkpoints whose config carries a HADConfig: switches them to `hamming_topk` attention."""

    requires_calibration = False

    def update_attn_implementation(self, config):  # transformers >= 5.2x calls this before building the model
        requested = getattr(config, "_attn_implementation_internal", None)
        if requested not in (None, HAD.name):
            logger.warning(
                "This checkpoint was distilled for HAD attention; loading it with attn_implementation=%r is "
                "overridden to %r. Use `had_hf.revert(model)` after loading for dense attention.",
                requested,
                HAD.name,
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

    - the attention modes of `had_hf.modes` (`hamming_topk`, `had_eager`, ...), each with a boolean mask function;
    - the quantization config and quantizer for `quant_method="had"` (reloading HAD checkpoints as HAD).
    """
    register_builtin_modes()
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
    """Tags HAD's attention modules (`had_hf.targets`) with their name, cross-attention flag, the shared HADConfig
    and the model's runtime state; every other module is tagged to run dense attention if it calls the interface.

    The attention function receives only the module, so these attributes are how it finds its layer's settings.
    They are plain attributes, so they survive `copy.deepcopy` (the student is a copy of the teacher).
    """
    targets = find_targets(model, had_config.target_modules)
    prefix = getattr(model, "base_model_prefix", "")
    state = getattr(model, STATE_ATTRIBUTE, None) or HADRuntimeState()
    for name, module in model.named_modules():
        for attribute in _MODULE_ATTRIBUTES:
            module.__dict__.pop(attribute, None)
        target = targets.get(name)
        if target is None:
            module._had_dense = True
            continue
        module._had_name = target.name
        module._had_is_cross = target.is_cross
        # names of checkpoints calibrated before names were made relative to the base model
        module._had_aliases = (f"{prefix}.{target.name}",) if prefix else ()
        module._had_config = had_config
    attach_state(model, state)
    _warn_on_uncalibrated_layers(model, had_config)


def _warn_on_uncalibrated_layers(model: torch.nn.Module, had_config: HADConfig) -> None:
    if not had_config.is_calibrated:
        return
    missing = [
        module._had_name
        for module in model.modules()
        if getattr(module, "_had_config", None) is had_config
        and had_config.binarizes(module._had_is_cross)
        and not any(n in (had_config.sigma_q or {}) for n in (module._had_name, *module._had_aliases))
    ]
    if missing:
        logger.warning(
            "The HADConfig holds no calibrated sigma for %d HAD layers (%s), which use sigma = 1.0; it has sigmas for "
            "%s. Was it calibrated on another model (or another transformers version's module names)?",
            len(missing),
            ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else ""),
            ", ".join(list(had_config.sigma_q)[:3]),
        )


def attention_module_names(model: torch.nn.Module) -> list[str]:
    """The names (in `model`) of its HAD attention modules."""
    return [name for name, module in model.named_modules() if getattr(module, "_had_config", None) is not None]


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
    model.config.attn_implementation = HAD.name
    attach(model, had_config)
    set_attention(model, HAD.name)


def convert(model: PreTrainedModel, had_config: HADConfig | None = None) -> PreTrainedModel:
    """Switches a model to HAD attention in place and returns it.

    Args:
        model (`PreTrainedModel`): a transformers model whose attention goes through the attention interface.
        had_config (`HADConfig`, *optional*): defaults to the HADConfig in `model.config` (a model built with
            `from_config` of a HAD config), else `HADConfig()` (top_n=30, uncalibrated).

    Raises:
        `UnsupportedModelError`: the model's attention does not use the interface (it would silently stay dense).
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"convert expects a transformers PreTrainedModel, got {type(model).__name__}.")
    if had_config is None:
        had_config = _saved_had_config(model) or HADConfig()
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
        for attribute in _MODULE_ATTRIBUTES:
            module.__dict__.pop(attribute, None)
    set_attention(model, attn_implementation)
    return model


def use_dense_capture(model: PreTrainedModel, had_config: HADConfig | None = None) -> PreTrainedModel:
    """Names the attention modules (those `had_config` targets) and switches to `had_eager` (dense softmax that
    records logits): the teacher's setting. `had_config` defaults to the model's own, else `HADConfig()`."""
    check_supported(model)
    attach(model, had_config or _saved_had_config(model) or HADConfig())
    set_attention(model, DENSE_CAPTURE.name)
    return model


def _saved_had_config(model: PreTrainedModel) -> HADConfig | None:
    """The HADConfig in `model.config` (an object, or the dict of a config read without the quantizer)."""
    config = getattr(model.config, "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD:
        config = HADConfig.from_dict(config)
    return config if isinstance(config, HADConfig) else None


def _verify_on_first_forward(model: PreTrainedModel) -> None:
    """After the first forward that returns, fail loudly if no attention layer called the HAD function. A forward that
    raises leaves the probe as it found it, and the next forward is checked.

    No graph depends on the probe. Attention running in compiled code only sets `CALL_PROBE.compiled_call` (a write,
    replayed after each run of its graph); the pre-hook clears it, and the post-hook reads it besides the eager count,
    so the check holds for a model compiled whole (its hooks traced, the first compiled call raising for a model that
    stays dense; traced hooks are kept, doing the same at no cost) and for one whose layers are compiled on their
    own (eager hooks)."""
    state = {}

    def before(module, args, kwargs):
        CALL_PROBE.compiled_call = False
        state.clear()
        if not torch.compiler.is_compiling():
            state["calls"], state["was_active"] = CALL_PROBE.calls, CALL_PROBE.active
            CALL_PROBE.active = True

    def after(module, args, kwargs, output):
        eager = "calls" in state  # the pre-hook ran in eager code (it may run traced while this hook does not)
        if eager:
            CALL_PROBE.active = state["was_active"]
        if output is None:  # the forward raised (the hook is called with no output), or returned nothing to check
            return
        if not torch.compiler.is_compiling():
            pre_handle.remove()
            post_handle.remove()
        called = CALL_PROBE.compiled_call or (eager and CALL_PROBE.calls != state["calls"])
        if not called and _uses_had(module):
            raise UnsupportedModelError(
                f"{type(module).__name__} ran a forward pass with attn_implementation='hamming_topk' without calling "
                "it: its attention does not go through transformers' AttentionInterface, so it stayed dense."
            )

    pre_handle = model.register_forward_pre_hook(before, with_kwargs=True)
    post_handle = model.register_forward_hook(after, with_kwargs=True, always_call=True)


def _uses_had(model: PreTrainedModel) -> bool:
    return getattr(model.config, "_attn_implementation", None) == HAD.name
