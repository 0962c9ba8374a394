"""The CAM hardware cost model: what one model's attention costs in a CAM design of HAD against BF16 attention.

The HAD paper gives, for one query against 256 keys of width 1024, the area and power of each attention component
(Q.K^T, top-N, softmax, A.V) in a BF16 digital design and in the HAD design (binary keys in a capacitive CAM,
1-bit XNOR matching, top-N, sparse A.V). This module scales that table to a model's attention geometry, context
length n and N, adds a latency and energy model built from CAMformer's module delays, and the bits the CAM must
hold. Every coefficient comes from a JSON file (`coefficients/default.json` unless the user passes their own), and
every modelling choice is written into the report as an assumption, so a hardware engineer can see and replace both.

Public API: `AttentionGeometry.from_config` and `cam_cost_report` here, `load_coefficients` in `cam_coefficients`,
`render_markdown`, `plot_cam_report` and `write_cam_report` in `cam_report`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..selection import check_sink_keys, check_top_n_rule, kept_slots
from .cam_coefficients import (
    COMPONENTS,
    DESIGNS,
    METRICS,
    REQUIRED_COEFFICIENTS,
    SOURCES,
    CAMCoefficients,
    CoefficientError,
    default_coefficients_path,
    load_coefficients,
    parse_coefficients,
)

REPORT_FORMAT = "had_hf.cam_report"


@dataclass(frozen=True)
class AttentionGeometry:
    """The shape of a model's attention, as the cost model sees it.

    Args:
        num_layers (`int`): attention layers (an encoder-decoder counts its encoder self-attention, decoder
            self-attention and cross-attention layers).
        num_heads (`int`): query heads per layer.
        head_dim (`int`): query/key dimension per head.
        num_kv_heads (`int`, *optional*): key/value heads (grouped-query attention); defaults to `num_heads`.
        hidden_size (`int`, *optional*): the model width, reported for reference.
        model_type (`str`, *optional*, defaults to `"custom"`): the transformers model type.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    hidden_size: int | None = None
    model_type: str = "custom"

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("num_layers", "num_heads", "head_dim", "num_kv_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AttentionGeometry.{name} must be a positive integer, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"AttentionGeometry.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}): each key/value head serves an equal group of query heads."
            )

    @property
    def query_width(self) -> int:
        """Dimensions a token's query carries into one layer's attention, all heads together."""
        return self.num_heads * self.head_dim

    @property
    def key_width(self) -> int:
        """Dimensions a token's key stores per layer (key/value heads times head dim)."""
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head (1 without grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any) -> AttentionGeometry:
        """Reads the attention geometry from a transformers `PretrainedConfig` (or its text config)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        num_heads = getattr(config, "num_attention_heads", None)
        hidden_size = getattr(config, "hidden_size", None)
        if getattr(config, "is_encoder_decoder", False):
            encoder = getattr(config, "num_layers", None) or getattr(config, "num_hidden_layers", None)
            decoder = getattr(config, "num_decoder_layers", None) or encoder
            num_layers = encoder + 2 * decoder if encoder else None
        else:
            num_layers = getattr(config, "num_hidden_layers", None)
        head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None)
        if head_dim is None and num_heads and hidden_size:
            head_dim = hidden_size // num_heads
        missing = [
            name
            for name, value in (
                ("num_hidden_layers", num_layers),
                ("num_attention_heads", num_heads),
                ("head_dim", head_dim),
            )
            if not value
        ]
        if missing:
            raise ValueError(
                f"Cannot read the attention geometry of {type(config).__name__}: no {', '.join(missing)}. "
                "Build an AttentionGeometry(num_layers=..., num_heads=..., head_dim=...) by hand."
            )
        return cls(
            num_layers=int(num_layers),
            num_heads=int(num_heads),
            head_dim=int(head_dim),
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
            hidden_size=int(hidden_size) if hidden_size else None,
            model_type=str(getattr(config, "model_type", "custom") or "custom"),
        )


def kept_keys(
    context_length: int, top_n: int | None = None, top_n_ratio: float | None = None, sink_keys: int = 0
) -> int:
    """The most keys a query keeps at a context length (`had_hf.selection.kept_slots`): N (`min(top_n, n)` for a
    fixed N, `ceil(top_n_ratio * n)`, at least 1, for the ratio rule) plus the `sink_keys` first keys, at most n."""
    check_top_n_rule(top_n, top_n_ratio)
    check_sink_keys(sink_keys)
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise ValueError(f"top_n must be a positive integer, got {top_n!r}.")
    if top_n_ratio is not None and not 0 < top_n_ratio <= 1:
        raise ValueError(f"top_n_ratio must be in (0, 1], got {top_n_ratio!r}.")
    return kept_slots(context_length, top_n, top_n_ratio, sink_keys)


def _ceil_log2(x: int) -> int:
    return (int(x) - 1).bit_length() if x > 1 else 0


def scale_factors(geometry: AttentionGeometry, n_keys: int, kept: int, coefficients: CAMCoefficients) -> dict:
    """The factors by which each component's area and power at the paper's reference point are multiplied.

    The reference point is one query (one head) of width `reference.width` against `reference.n_keys` keys keeping
    `reference.top_n`. A layer runs one query per head: Q.K^T and BF16 A.V scale with n_keys x (heads x head_dim);
    top-N and softmax with n_keys per head (top-N also with log2 N, the depth of a sorter); HAD A.V additionally
    with the kept fraction N / n_keys relative to the paper's. The HAD Q.K^T is a CAM that stores the keys and
    computes with them: its area follows the keys it holds, n_keys x (key/value heads x head_dim), while its power
    (one search per query head) follows the query heads; without grouped-query attention the two are equal.

    Returns:
        `dict`: `{"area" | "power": {"bf16" | "had": {component: factor}}}`.
    """
    n0, w0, top0 = coefficients["reference.n_keys"], coefficients["reference.width"], coefficients["reference.top_n"]
    keys_times_width = n_keys * geometry.query_width / (n0 * w0)
    stored_keys_times_width = n_keys * geometry.key_width / (n0 * w0)
    per_head_keys = geometry.num_heads * n_keys / n0
    kept_fraction_ratio = (kept / n_keys) / (top0 / n0)
    sorter_depth_ratio = math.log2(max(kept, 2)) / math.log2(max(top0, 2))
    power = {
        "bf16": {"qk": keys_times_width, "topn": per_head_keys, "softmax": per_head_keys, "av": keys_times_width},
        "had": {
            "qk": keys_times_width,
            "topn": per_head_keys * sorter_depth_ratio,
            "softmax": per_head_keys,
            "av": keys_times_width * kept_fraction_ratio,
        },
    }
    area = {design: dict(factors) for design, factors in power.items()}
    area["had"]["qk"] = stored_keys_times_width
    return {"area": area, "power": power}


def latency_cycles(geometry: AttentionGeometry, n_keys: int, kept: int, coefficients: CAMCoefficients) -> dict:
    """Pipeline depth in cycles of each component for one token's query in one layer (all heads in parallel).

    Built from CAMformer's module delays: a dot product of length L is one BF16 multiply followed by an adder tree of
    ceil(log2 L) levels, each a MAC delay; the CAM returns every key's Hamming distance in one search plus an ADC
    conversion (with grouped-query attention the query heads of a group search their shared CAM one after another);
    the top-N is a tree of halving stages (CAMformer's 64->32 unit) from n_keys down to N; the softmax is
    scaler, exponent LUT, an accumulator tree over the entries it normalizes, and a divider.
    """
    c = coefficients
    mac, acc = c["cycles.bf16_mac"], c["cycles.softmax_accumulator"]
    softmax_fixed = c["cycles.scaler"] + c["cycles.softmax_lut"] + c["cycles.softmax_divider"]
    halving_stages = math.ceil(math.log2(n_keys / kept)) if n_keys > kept else 0
    return {
        "bf16": {
            "qk": mac * (1 + _ceil_log2(geometry.head_dim)),
            "topn": 0.0,
            "softmax": softmax_fixed + acc * _ceil_log2(n_keys),
            "av": mac * (1 + _ceil_log2(n_keys)),
        },
        "had": {
            "qk": c["cycles.cam_search"] * geometry.group_size + c["cycles.adc"],
            "topn": c["cycles.topn_merge"] * halving_stages,
            "softmax": softmax_fixed + acc * _ceil_log2(kept),
            "av": mac * (1 + _ceil_log2(kept)),
        },
    }


def _layer_costs(geometry: AttentionGeometry, n_keys: int, kept: int, coefficients: CAMCoefficients) -> dict:
    """Per-layer area, power, energy per token and latency of every component of both designs, with totals."""
    scales = scale_factors(geometry, n_keys, kept, coefficients)
    latencies = latency_cycles(geometry, n_keys, kept, coefficients)
    # energy per token = power x time between tokens (initiation interval / clock); W / MHz = uJ, x 1e3 -> nJ
    seconds_per_token_ns = coefficients["initiation_interval_cycles"] / coefficients["clock_mhz"] * 1e3
    costs: dict[str, dict[str, dict[str, float]]] = {}
    for design in DESIGNS:
        costs[design] = {}
        for component in COMPONENTS:
            power = coefficients[f"{design}.{component}.power_w"] * scales["power"][design][component]
            costs[design][component] = {
                "area_mm2": coefficients[f"{design}.{component}.area_mm2"] * scales["area"][design][component],
                "power_w": power,
                "energy_per_token_nj": power * seconds_per_token_ns,
                "latency_cycles": float(latencies[design][component]),
            }
        costs[design]["total"] = {
            metric: sum(costs[design][component][metric] for component in COMPONENTS) for metric in METRICS
        }
    return costs


def _times(costs: dict, factor: int) -> dict:
    return {
        design: {
            part: {metric: value * factor for metric, value in metrics.items()} for part, metrics in parts.items()
        }
        for design, parts in costs.items()
    }


def _ratios(costs: dict) -> tuple[dict, dict]:
    """HAD / BF16 for every component and metric, and the reduction 1 - ratio in percent (None where BF16 is 0)."""
    ratio, reduction = {}, {}
    for part in (*COMPONENTS, "total"):
        ratio[part], reduction[part] = {}, {}
        for metric in METRICS:
            bf16, had = costs["bf16"][part][metric], costs["had"][part][metric]
            ratio[part][metric] = had / bf16 if bf16 > 0 else None
            reduction[part][metric] = 100.0 * (1.0 - had / bf16) if bf16 > 0 else None
    return ratio, reduction


def _with_ratios(costs: dict) -> dict:
    ratio, reduction = _ratios(costs)
    return {**costs, "ratio_had_over_bf16": ratio, "reduction_percent": reduction}


def _assumptions(coefficients: CAMCoefficients) -> list[str]:
    n0, w0, top0 = (int(coefficients[k]) for k in ("reference.n_keys", "reference.width", "reference.top_n"))
    return [
        f"Area and power are the paper's table (one query, {n0} keys of width {w0}, N = {top0}) scaled linearly. "
        "The paper's figures were themselves synthesized on a small module and scaled to the full design.",
        "A layer computes one query per head. Q.K^T (both designs) and BF16 A.V scale with n_keys x (heads x "
        f"head_dim) / ({n0} x {w0}): the hardware has one multiplier (BF16) or CAM cell (HAD) per key and dimension.",
        f"Top-N and softmax scale with n_keys / {n0} per head (one unit per head); top-N also with log2(N) / "
        f"log2({top0}), the depth of a sorting network.",
        f"HAD A.V scales as BF16 A.V times the kept fraction (N / n_keys) / ({top0} / {n0}): only N rows of V are read.",
        "The softmax cost follows n_keys in both designs (as the paper's natural scaling states), although HAD "
        "normalizes only N entries; this overstates HAD's softmax.",
        "Attention sinks (a model with HADConfig.sink_keys = k): a query keeps its first k keys beside its top N, "
        "so N in every formula is N + k (at most n), the most keys a query keeps. The top-N unit is costed as if "
        "it selected N + k, which overstates it slightly: the sinks are fixed positions that need no sorting.",
        "Grouped-query attention: the CAM stores each key/value head's keys once (HAD Q.K^T area and CAM bits "
        "follow n_keys x key/value heads x head_dim); the query heads of a group search it one after another (HAD "
        "Q.K^T power and energy follow the query heads, its latency has one search per query head of the group). "
        "BF16 Q.K^T and A.V compute per query head.",
        "Energy per token = power x initiation interval / clock: both designs are pipelined and accept one query "
        f"vector per {coefficients['initiation_interval_cycles']:g} cycle(s) at {coefficients['clock_mhz']:g} MHz "
        "(the CAM's single-cycle search rate). Energy ratios therefore equal power ratios.",
        "Latency is the pipeline depth of one token's query through one layer, from CAMformer's module delays "
        "(component formulas in `latency_cycles`); a head's key is one CAM row whose Hamming distance one search and "
        "one ADC conversion return (partial sums of 64-column tiles for head_dim > 64 are not modelled).",
        "Model totals: every attention layer has its own hardware (areas add up), layers run one after another "
        "(latencies add up), and each token passes every layer once (energies add up).",
        "The cell-model figures (CAMformer's 10T1C cell, 28 nm) are an independent bottom-up estimate of the HAD CAM "
        "alone, in a different process from the paper's table; they are not part of the totals.",
        "The process nodes of the sources differ (paper: not stated; CAMformer modules: 40-65 nm; cell: 28 nm); no "
        "node scaling is applied.",
    ]


def cam_cost_report(
    geometry: AttentionGeometry,
    context_length: int,
    top_n: int | None = None,
    top_n_ratio: float | None = None,
    coefficients: CAMCoefficients | None = None,
    sink_keys: int = 0,
) -> dict[str, Any]:
    """The CAM cost report of a model at context length n and N, as a JSON-serializable dict.

    Args:
        geometry (`AttentionGeometry`): the model's attention shape (`AttentionGeometry.from_config(config)`).
        context_length (`int`): n, the number of keys each query sees.
        top_n (`int`, *optional*): a fixed N (capped at n). Exactly one of `top_n` and `top_n_ratio`.
        top_n_ratio (`float`, *optional*): N = ceil(top_n_ratio * n).
        coefficients (`CAMCoefficients`, *optional*): defaults to the packaged coefficients.
        sink_keys (`int`, *optional*, defaults to 0): the model's attention sinks (`HADConfig.sink_keys`); the
            report's `top_n` is then the most keys a query keeps, N + `sink_keys` (at most n).

    Returns:
        `dict`: `per_layer` and `model_total` (each `{"bf16"|"had": {component|"total": {metric: value}},
        "ratio_had_over_bf16": ..., "reduction_percent": ...}`), `cam_bits`, `cell_model`, `scale_factors`,
        `assumptions`, `coefficients` (every figure with unit and source) and `sources`. A decoder's cost per
        generated token at several context lengths is `cam_generation.generation_costs`.
    """
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}.")
    coefficients = coefficients if coefficients is not None else load_coefficients()
    kept = kept_keys(context_length, top_n, top_n_ratio, sink_keys)
    per_layer = _layer_costs(geometry, context_length, kept, coefficients)
    model_total = _times(per_layer, geometry.num_layers)
    # model latency adds up layer by layer, which `_times` already does; areas, power and energy add up too
    key_bits = context_length * geometry.key_width
    searched_bits = context_length * geometry.query_width
    cell = {
        "cam_area_mm2_per_layer": key_bits
        * coefficients["cell.area_um2"]
        * (1 + coefficients["cell.peripheral_fraction"])
        / 1e6,
        "search_energy_per_token_nj_per_layer": searched_bits * coefficients["cell.search_energy_fj_per_bit"] / 1e6,
        "write_energy_per_token_nj_per_layer": geometry.key_width * coefficients["cell.write_energy_fj_per_bit"] / 1e6,
    }
    cell.update(
        {key.replace("_per_layer", "_model"): value * geometry.num_layers for key, value in list(cell.items())}
    )
    return {
        "format": REPORT_FORMAT,
        "version": 1,
        "model": asdict(geometry),
        "operating_point": {
            "context_length": context_length,
            "top_n": kept,
            "top_n_rule": {"top_n": top_n, "top_n_ratio": top_n_ratio, "sink_keys": sink_keys},
            "kept_fraction": kept / context_length,
            "clock_mhz": coefficients["clock_mhz"],
        },
        "per_layer": _with_ratios(per_layer),
        "model_total": _with_ratios(model_total),
        "cam_bits": {
            "per_layer": key_bits,
            "model": key_bits * geometry.num_layers,
            "formula": "n_keys x num_kv_heads x head_dim (x attention layers for the model)",
            "query_bits_per_token_per_layer": geometry.query_width,
            "bf16_key_bits_per_layer": key_bits * int(coefficients["bf16.bits_per_element"]),
            "bf16_key_bits_model": key_bits * int(coefficients["bf16.bits_per_element"]) * geometry.num_layers,
        },
        "cell_model": cell,
        "scale_factors": scale_factors(geometry, context_length, kept, coefficients),
        "assumptions": _assumptions(coefficients),
        "coefficients_file": coefficients.path,
        "coefficients": coefficients.to_dict(),
        "sources": list(SOURCES),
    }


__all__ = [
    "REQUIRED_COEFFICIENTS",
    "AttentionGeometry",
    "CAMCoefficients",
    "CoefficientError",
    "cam_cost_report",
    "default_coefficients_path",
    "kept_keys",
    "latency_cycles",
    "load_coefficients",
    "parse_coefficients",
    "scale_factors",
]
