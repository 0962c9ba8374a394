"""A decoder's attention cost per generated token: the CAM cost model at several context lengths.

Generating a token runs one new query per head against the n keys of the cache in every layer. The rows of
`generation_costs` are the whole model's cost of that step at each n of a list (by default 1k, 2k, 4k and 8k tokens),
for the HAD-CAM design and BF16 attention, from the same per-layer cost model as the rest of the report
(`cam._layer_costs`); `cam_report` renders them as a table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .cam import AttentionGeometry, _layer_costs, _ratios, _times, kept_keys
from .cam_coefficients import DESIGNS, CAMCoefficients, load_coefficients

DEFAULT_GENERATION_LENGTHS = (1024, 2048, 4096, 8192)
GENERATION_METRICS = ("energy_per_token_nj", "latency_cycles", "area_mm2")


def check_generation_lengths(context_lengths: Any) -> list[int]:
    """The context lengths of a per-generated-token table, increasing and without repeats, after checking that they
    are a non-empty sequence of positive integers."""
    if isinstance(context_lengths, (str, bytes)) or not hasattr(context_lengths, "__iter__"):
        raise ValueError(f"generation_lengths must be a list of positive integers, got {context_lengths!r}.")
    lengths = list(context_lengths)
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if not lengths or bad:
        raise ValueError(
            "generation_lengths must be a non-empty list of positive integers (context lengths n in tokens, e.g. "
            f"1024, 2048, 4096, 8192), got {lengths!r}" + (f": {bad!r} not allowed." if bad else ".")
        )
    return sorted(set(lengths))


def generation_costs(
    geometry: AttentionGeometry,
    context_lengths: Sequence[int] = DEFAULT_GENERATION_LENGTHS,
    top_n: int | None = None,
    top_n_ratio: float | None = None,
    coefficients: CAMCoefficients | None = None,
    sink_keys: int = 0,
) -> list[dict[str, Any]]:
    """What the whole model's attention costs per generated token of a decoder, at each context length n.

    Generating a token runs one new query per head against the n cached keys in every layer, keeping
    N = `kept_keys(n, top_n, top_n_ratio, sink_keys)`: the per-layer costs of `_layer_costs` at (n, N), times the
    layers.

    Returns:
        `list[dict]`: per n, increasing: `context_length`, `top_n`, `bf16` and `had` (`area_mm2`, `power_w`,
        `energy_per_token_nj`, `latency_cycles`, `latency_us`), `ratio_had_over_bf16` (the same metrics), and the
        key storage of the cache: `cam_key_bits` (n x key/value heads x head_dim x layers) and `bf16_key_bits`.
    """
    coefficients = coefficients if coefficients is not None else load_coefficients()
    rows = []
    for n in check_generation_lengths(context_lengths):
        kept = kept_keys(n, top_n, top_n_ratio, sink_keys)
        model = _times(_layer_costs(geometry, n, kept, coefficients), geometry.num_layers)
        totals = {design: dict(model[design]["total"]) for design in DESIGNS}
        for design in DESIGNS:
            totals[design]["latency_us"] = totals[design]["latency_cycles"] / coefficients["clock_mhz"]
        ratio = _ratios(model)[0]["total"]
        key_bits = n * geometry.key_width * geometry.num_layers
        rows.append(
            {
                "context_length": n,
                "top_n": kept,
                **totals,
                "ratio_had_over_bf16": {**ratio, "latency_us": ratio["latency_cycles"]},
                "cam_key_bits": key_bits,
                "bf16_key_bits": key_bits * int(coefficients["bf16.bits_per_element"]),
            }
        )
    return rows


__all__ = ["DEFAULT_GENERATION_LENGTHS", "GENERATION_METRICS", "check_generation_lengths", "generation_costs"]
