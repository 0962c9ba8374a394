"""`HADConfig`: what a Hamming-attention model needs to know about its attention.

The config travels inside the model's `config.json` as its `quantization_config` (with `quant_method="had"`), so
that transformers hands it back to had_hf's quantizer on every `from_pretrained` (see `integration.py` for why). It
describes the saved model only; the training stage of a distillation run is runtime state (`had_hf.state`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .selection import check_sink_keys

DEFAULT_TOP_N = 30


@dataclass
class HADConfig(QuantizationConfigMixin):
    """Configuration of Hamming attention (HAD): binarized queries and keys, Hamming logits, top-N sparse softmax.

    Args:
        top_n (`int`, *optional*):
            Number of keys each query keeps. Exactly one of `top_n` and `top_n_ratio` may be set; when neither is,
            `top_n` defaults to 30 (the paper's value at 256 tokens).
        top_n_ratio (`float`, *optional*):
            Keep `ceil(top_n_ratio * n_keys)` keys per query, for long-context models whose N scales with the
            context (the paper uses 15/128 = 0.117).
        sink_keys (`int`, *optional*, defaults to 0):
            Attention sinks: each query also keeps its first `sink_keys` valid keys, whatever their scores, beside its
            top N (`had_hf.selection`). Not in the paper (0 is its rule): decoder LLMs put much of their attention
            on the sequence's first key, which a top N of binary scores seldom keeps. The Triton kernels and the
            exporter keep the sinks too.
        sigma_q (`dict[str, float]`, *optional*):
            Per-layer standardization coefficient of the queries, keyed by the attention module's name in the model
            (e.g. `"bert.encoder.layer.0.attention.self"`). `None` until `had_hf.calibrate` has run; an
            uncalibrated layer uses 1.0.
        sigma_k (`dict[str, float]`, *optional*):
            Same as `sigma_q`, for the keys. A value may also be a list of floats, one per head (one per key/value
            head for `sigma_k`): see `sigma_per_head`.
        sigma_per_head (`bool`, *optional*, defaults to `False`):
            Whether `had_hf.calibrate` measures one sigma per head instead of one per layer (METHOD.md's choice).
            Not in the paper: a lever of our own, which gives each head its own softmax temperature
            `alpha = sigma_q * sigma_k * s` in the binary stage. The Triton decode kernels and the exporter take
            per-layer sigma only.
        ste_clip (`float`, *optional*, defaults to 1.0):
            The straight-through estimator passes gradient where `|x / sigma| <= ste_clip`.
        binarize_self_attention (`bool`, *optional*, defaults to `True`):
            Whether self-attention layers use Hamming attention.
        binarize_cross_attention (`bool`, *optional*, defaults to `True`):
            Whether cross-attention layers (encoder-decoder models) use Hamming attention; when `False` they stay
            dense (standard softmax attention).
        target_modules (`list[str]`, *optional*):
            Regular expressions matching the end of the names of the attention modules HAD replaces (e.g.
            `["self_attn"]`), instead of had_hf's table for the model type (`had_hf.targets.TARGET_MODULES`).
    """

    quant_method: str = field(default="had", metadata={"help": "Fixed to `had`: the key transformers dispatches on."})
    top_n: int | None = field(default=None, metadata={"help": "Keys kept per query (default 30)."})
    top_n_ratio: float | None = field(default=None, metadata={"help": "Keep ceil(ratio * n_keys) keys per query."})
    sink_keys: int = field(default=0, metadata={"help": "Also keep each query's first k valid keys (0: none)."})
    sigma_q: dict[str, float] | None = field(default=None, metadata={"help": "Per-layer query std (calibrated)."})
    sigma_k: dict[str, float] | None = field(default=None, metadata={"help": "Per-layer key std (calibrated)."})
    sigma_per_head: bool = field(default=False, metadata={"help": "Calibrate sigma per head, not per layer."})
    ste_clip: float = field(default=1.0, metadata={"help": "STE passes gradient where |x/sigma| <= ste_clip."})
    binarize_self_attention: bool = field(default=True, metadata={"help": "Binarize self-attention layers."})
    binarize_cross_attention: bool = field(default=True, metadata={"help": "Binarize cross-attention layers."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Name patterns of the attention modules to replace (default: per model type)."}
    )

    def __post_init__(self):
        if self.quant_method != "had":
            raise ValueError(f"HADConfig.quant_method must be 'had', got {self.quant_method!r}.")
        if self.top_n is not None and self.top_n_ratio is not None:
            raise ValueError(
                f"Set exactly one of top_n and top_n_ratio, got top_n={self.top_n} and top_n_ratio={self.top_n_ratio}."
            )
        if self.top_n is None and self.top_n_ratio is None:
            self.top_n = DEFAULT_TOP_N
        if self.top_n is not None and (
            isinstance(self.top_n, bool) or not isinstance(self.top_n, int) or self.top_n < 1
        ):
            raise ValueError(f"top_n must be a positive integer, got {self.top_n!r}.")
        if self.top_n_ratio is not None and not (
            not isinstance(self.top_n_ratio, bool)
            and isinstance(self.top_n_ratio, (int, float))
            and 0.0 < self.top_n_ratio <= 1.0
        ):
            raise ValueError(f"top_n_ratio must be a number in (0, 1], got {self.top_n_ratio!r}.")
        if (
            isinstance(self.ste_clip, bool)
            or not isinstance(self.ste_clip, (int, float))
            or not (math.isfinite(self.ste_clip) and self.ste_clip > 0)
        ):
            raise ValueError(f"ste_clip must be a finite number > 0, got {self.ste_clip!r}.")
        check_sink_keys(self.sink_keys)
        self.target_modules = _validate_target_modules(self.target_modules)
        for name in ("sigma_q", "sigma_k"):
            setattr(self, name, _validate_sigma(name, getattr(self, name)))
        for name in ("binarize_self_attention", "binarize_cross_attention", "sigma_per_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")

    def num_kept(self, num_keys: int) -> int:
        """N for a row that may attend to `num_keys` keys (see `had_hf.selection.kept_counts`, the rule itself)."""
        from .selection import kept_counts

        return int(kept_counts(torch.tensor(num_keys), self.top_n, self.top_n_ratio))

    @property
    def num_kept_args(self) -> dict[str, int | float | None]:
        """`top_n`, `top_n_ratio` and `sink_keys`, as the selection functions and the attention op take them."""
        return {"top_n": self.top_n, "top_n_ratio": self.top_n_ratio, "sink_keys": self.sink_keys}

    def sigmas(
        self, layer_name: str | None, aliases: tuple[str, ...] = ()
    ) -> tuple[float | tuple[float, ...], float | tuple[float, ...]]:
        """The (sigma_q, sigma_k) of a layer: floats, or tuples (one per head) where calibrated per head; 1.0 where
        the layer is not calibrated. `aliases` are other names the layer may be stored under (checkpoints written
        before names were made relative to the base model)."""
        values = []
        for table in (self.sigma_q, self.sigma_k):
            table = table or {}
            value = next((table[n] for n in (layer_name, *aliases) if n is not None and n in table), 1.0)
            values.append(tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value))
        return values[0], values[1]

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style read of a field (transformers reads `quantization_config.get("quant_method")` when a model is
        reloaded with `config=model.config`)."""
        return getattr(self, key, default) if key in {f.name for f in dataclasses.fields(self)} else default

    @property
    def has_per_head_sigma(self) -> bool:
        """Whether any layer has one sigma per head (lists in `sigma_q` / `sigma_k`)."""
        tables = [self.sigma_q or {}, self.sigma_k or {}]
        return any(isinstance(value, (list, tuple)) for table in tables for value in table.values())

    @property
    def is_calibrated(self) -> bool:
        return bool(self.sigma_q) and bool(self.sigma_k)

    def binarizes(self, is_cross_attention: bool) -> bool:
        return self.binarize_cross_attention if is_cross_attention else self.binarize_self_attention

    def to_dict(self) -> dict[str, Any]:
        # fields set after construction skipped the checks: check again, so that a bad value fails when it is saved,
        # not when the checkpoint is loaded
        self.__post_init__()
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Builds a config from a dict, dropping (with a warning) keys written by a newer had_hf.

        `stage` and `c`, which configs saved by had_hf 0.1 carried, are runtime state now: dropped, with a warning
        unless the stage was the inference one (`"binary"`) every saved model had.
        """
        config_dict = dict(config_dict)
        legacy_stage, _ = config_dict.pop("stage", "binary"), config_dict.pop("c", None)
        if legacy_stage != "binary":
            warnings.warn(
                f"Ignoring the saved training stage {legacy_stage!r}: a loaded HAD model is in the inference stage "
                "(use `had_hf.set_stage` to train it further).",
                UserWarning,
                stacklevel=2,
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            warnings.warn(
                f"Ignoring unknown HADConfig keys {unknown} (written by a newer had_hf?).", UserWarning, stacklevel=2
            )
        config = cls(**{k: v for k, v in config_dict.items() if k in known})
        unused = {}
        for key, value in kwargs.items():
            if key in known:
                setattr(config, key, value)
            else:
                unused[key] = value
        if kwargs:
            config.__post_init__()
        return (config, unused) if return_unused_kwargs else config


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _validate_sigma(name: str, value: Any) -> dict[str, float | list[float]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict mapping attention-module names to floats, or None; got {value!r}.")
    checked = {}
    for layer, sigma in value.items():
        if not isinstance(layer, str):
            raise ValueError(f"{name} keys must be module names (str), got {layer!r}.")
        if isinstance(sigma, (list, tuple)):
            if not sigma or not all(_positive_number(v) for v in sigma):
                raise ValueError(
                    f"{name}[{layer!r}] must be a finite number > 0 or a non-empty list of them (one per head), "
                    f"got {sigma!r}."
                )
            checked[layer] = [float(v) for v in sigma]
        elif _positive_number(sigma):
            checked[layer] = float(sigma)
        else:
            raise ValueError(
                f"{name}[{layer!r}] must be a finite number > 0 or a list of them (one per head), got {sigma!r}."
            )
    return checked


def _validate_target_modules(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"target_modules must be a non-empty list of regular expressions, or None; got {value!r}.")
    for pattern in value:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"target_modules entry {pattern!r} is not a regular expression: {error}.") from None
    return list(value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    return list(value) if isinstance(value, tuple) else value
