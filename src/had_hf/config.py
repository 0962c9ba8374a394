"""`HADConfig`: what a Hamming-attention model needs to know about its attention.

The config travels inside the model's `config.json` as its `quantization_config` (with `quant_method="had"`), so
that transformers hands it back to had_hf's quantizer on every `from_pretrained` (see `integration.py` for why).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

STAGES = ("tanh", "sign", "ste", "binary")
"""The binarization stages of METHOD.md section 2, in training order; `binary` is inference."""

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
        stage (`str`, *optional*, defaults to `"binary"`):
            The transform applied to queries and keys: `"tanh"` (stage 1, `sigma*c*tanh(x/(c*sigma))`), `"sign"`
            (stage 2, `sigma*tanh(x/(c*sigma))`), `"ste"` (stages 3-4, `sigma*sign(x)` with a clipped
            straight-through gradient) or `"binary"` (inference, `sigma*sign(x)`).
        c (`float`, *optional*, defaults to 1.0):
            The temperature of the tanh stages; ignored by `"ste"` and `"binary"`.
        ste_clip (`float`, *optional*, defaults to 1.0):
            The straight-through estimator passes gradient where `|x / sigma| <= ste_clip`.
        binarize_self_attention (`bool`, *optional*, defaults to `True`):
            Whether self-attention layers use Hamming attention.
        binarize_cross_attention (`bool`, *optional*, defaults to `True`):
            Whether cross-attention layers (encoder-decoder models) use Hamming attention; when `False` they stay
            dense (standard softmax attention).
    """

    quant_method: str = field(default="had", metadata={"help": "Fixed to `had`: the key transformers dispatches on."})
    top_n: int | None = field(default=None, metadata={"help": "Keys kept per query (default 30)."})
    top_n_ratio: float | None = field(default=None, metadata={"help": "Keep ceil(ratio * n_keys) keys per query."})
    sigma_q: dict[str, float] | None = field(default=None, metadata={"help": "Per-layer query std (calibrated)."})
    sigma_k: dict[str, float] | None = field(default=None, metadata={"help": "Per-layer key std (calibrated)."})
    sigma_per_head: bool = field(default=False, metadata={"help": "Calibrate sigma per head, not per layer."})
    stage: str = field(default="binary", metadata={"help": f"One of {STAGES}."})
    c: float = field(default=1.0, metadata={"help": "Temperature of the tanh stages."})
    ste_clip: float = field(default=1.0, metadata={"help": "STE passes gradient where |x/sigma| <= ste_clip."})
    binarize_self_attention: bool = field(default=True, metadata={"help": "Binarize self-attention layers."})
    binarize_cross_attention: bool = field(default=True, metadata={"help": "Binarize cross-attention layers."})

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
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}.")
        for name in ("c", "ste_clip"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        for name in ("sigma_q", "sigma_k"):
            setattr(self, name, _validate_sigma(name, getattr(self, name)))
        for name in ("binarize_self_attention", "binarize_cross_attention", "sigma_per_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")

    def num_kept(self, num_keys: int) -> int:
        """N for a row of `num_keys` keys: `top_n`, or `ceil(top_n_ratio * num_keys)` (at least 1)."""
        if self.top_n is not None:
            return self.top_n
        return max(1, math.ceil(self.top_n_ratio * num_keys))

    def sigmas(self, layer_name: str | None) -> tuple[float | tuple[float, ...], float | tuple[float, ...]]:
        """The (sigma_q, sigma_k) of a layer: floats, or tuples (one per head) where calibrated per head; 1.0 where
        the layer is not calibrated."""
        values = []
        for table in (self.sigma_q, self.sigma_k):
            value = (table or {}).get(layer_name, 1.0) if layer_name is not None else 1.0
            values.append(tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value))
        return values[0], values[1]

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
        """Builds a config from a dict, dropping (with a warning) keys written by a newer had_hf."""
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


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value
