"""The CAM cost report as files: JSON, a Markdown document and a bar chart (matplotlib, imported when drawn)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cam import AttentionGeometry, _layer_costs, kept_keys
from .cam_coefficients import (
    COMPONENT_LABELS,
    COMPONENTS,
    DESIGN_LABELS,
    DESIGNS,
    METRICS,
    CAMCoefficients,
    parse_coefficients,
)
from .cam_generation import GENERATION_METRICS

REPORT_FILENAMES = ("cam_report.json", "cam_report.md", "cam_report.png")


def _coefficients_from_report(report: Mapping[str, Any]) -> CAMCoefficients:
    return parse_coefficients({"coefficients": report["coefficients"]}, report.get("coefficients_file", "report"))


def _format(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 10 ** (-digits)):
        return f"{value:.{digits}e}"
    return f"{value:,.{digits}f}"


def _cost_tables(section: Mapping[str, Any]) -> list[str]:
    """Two Markdown tables of one section (per layer or model): the values of both designs, then HAD / BF16."""
    short = {
        "area_mm2": "area mm2",
        "power_w": "power W",
        "energy_per_token_nj": "energy/token nJ",
        "latency_cycles": "latency cycles",
    }
    values = ["| component | " + " | ".join(f"{short[m]} {d}" for m in METRICS for d in ("BF16", "HAD")) + " |"]
    values.append("|---" * (1 + 2 * len(METRICS)) + "|")
    ratios = ["| component (HAD / BF16) | " + " | ".join(short[m] for m in METRICS) + " |"]
    ratios.append("|---" * (1 + len(METRICS)) + "|")
    for part in (*COMPONENTS, "total"):
        label = COMPONENT_LABELS.get(part, "**total**")
        cells = []
        for metric in METRICS:
            digits = 0 if metric == "latency_cycles" else 3
            cells += [_format(section[design][part][metric], digits) for design in DESIGNS]
        values.append(f"| {label} | " + " | ".join(cells) + " |")
        ratios.append(
            f"| {label} | " + " | ".join(_format(section["ratio_had_over_bf16"][part][m], 3) for m in METRICS) + " |"
        )
    return values + [""] + ratios


def render_generation_table(report: Mapping[str, Any]) -> list[str]:
    """The section of a decoder's cost per generated token: one row per context length, both designs and HAD / BF16."""
    rows, model = report.get("per_generated_token"), report["model"]
    if not rows:
        return []
    group = model["num_heads"] // model["num_kv_heads"]
    short = {"energy_per_token_nj": "energy nJ", "latency_cycles": "latency cycles", "area_mm2": "area mm2"}
    header = " | ".join(f"{short[m]} {label}" for m in GENERATION_METRICS for label in ("BF16", "HAD", "HAD/BF16"))
    lines = [
        "## Per generated token (decoder)",
        "",
        f"Generating one token: in each of the {model['num_layers']} layers, one new query per head "
        f"({model['num_heads']} query heads) against the n cached keys, N kept. The keys are stored once per "
        f"key/value head ({model['num_kv_heads']}, each shared by {group} query head(s)). Whole-model attention; "
        "area is the hardware that holds and searches a context of n keys.",
        "",
        f"| n | N | {header} | CAM key bits | BF16 key bits |",
        "|---" * (3 + 3 * len(GENERATION_METRICS) + 1) + "|",
    ]
    for row in rows:
        cells = []
        for metric in GENERATION_METRICS:
            digits = 0 if metric == "latency_cycles" else 3
            cells += [_format(row["bf16"][metric], digits), _format(row["had"][metric], digits)]
            cells.append(_format(row["ratio_had_over_bf16"][metric], 3))
        lines.append(
            f"| {row['context_length']:,} | {row['top_n']:,} | "
            + " | ".join(cells)
            + f" | {row['cam_key_bits']:,} | {row['bf16_key_bits']:,} |"
        )
    return lines + [""]


def _sinks_note(point: Mapping[str, Any]) -> str:
    sinks = point["top_n_rule"].get("sink_keys", 0)
    return f"(at most: the top N and the first {sinks} key(s), attention sinks) " if sinks else ""


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as a Markdown document: operating point, cost tables, CAM bits, assumptions, coefficients."""
    model, point = report["model"], report["operating_point"]
    per_layer, total = report["per_layer"], report["model_total"]
    reduction = total["reduction_percent"]["total"]
    bits = report["cam_bits"]
    lines = [
        "# CAM hardware cost report: HAD-CAM vs BF16 attention",
        "",
        f"Model `{model['model_type']}`: {model['num_layers']} attention layers, {model['num_heads']} heads "
        f"({model['num_kv_heads']} key/value heads) of dimension {model['head_dim']}, hidden size {model['hidden_size']}.",
        f"Operating point: context length n = {point['context_length']}, N = {point['top_n']} keys kept per query "
        f"{_sinks_note(point)}(kept fraction {point['kept_fraction']:.3f}), clock {point['clock_mhz']:g} MHz.",
        "",
        f"**Whole model: HAD-CAM needs {_format(reduction['area_mm2'], 2)}% less area, "
        f"{_format(reduction['power_w'], 2)}% less power and {_format(reduction['energy_per_token_nj'], 2)}% less energy "
        "per token than BF16 attention.**",
        "",
        *render_generation_table(report),
        "## Per layer",
        "",
        *_cost_tables(per_layer),
        "",
        f"## Model total ({model['num_layers']} layers)",
        "",
        *_cost_tables(total),
        "",
        "## CAM storage",
        "",
        f"- Binary keys the CAM holds: {bits['per_layer']:,} bits per layer, {bits['model']:,} bits for the model "
        f"({bits['formula']}).",
        f"- The same keys in BF16: {bits['bf16_key_bits_per_layer']:,} bits per layer, {bits['bf16_key_bits_model']:,} "
        "for the model.",
        f"- Query bits per token and layer: {bits['query_bits_per_token_per_layer']:,}.",
        "",
        "## Cross-check: CAMformer's cell model (HAD CAM array only)",
        "",
        "| quantity | per layer | model |",
        "|---|---|---|",
    ]
    cell = report["cell_model"]
    for key, label in (
        ("cam_area", "CAM area, cells + periphery (mm2)"),
        ("search_energy_per_token", "search energy per token (nJ)"),
        ("write_energy_per_token", "write energy per token, one new key (nJ)"),
    ):
        suffix = "_mm2" if key == "cam_area" else "_nj"
        lines.append(f"| {label} | {cell[f'{key}{suffix}_per_layer']:.4g} | {cell[f'{key}{suffix}_model']:.4g} |")
    lines += ["", "## Assumptions", ""]
    lines += [f"{index}. {text}" for index, text in enumerate(report["assumptions"], 1)]
    lines += [
        "",
        f"## Coefficients (file: `{report['coefficients_file']}`)",
        "",
        "| name | value | unit | source |",
        "|---|---|---|---|",
    ]
    for name, entry in report["coefficients"].items():
        lines.append(f"| `{name}` | {entry['value']:g} | {entry['unit']} | {entry['source']} |")
    lines += ["", "## Sources", ""] + [f"- {source}" for source in report["sources"]]
    return "\n".join(lines) + "\n"


def plot_cam_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Plots model area and energy per token of both designs against context length (log-log), saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    geometry = AttentionGeometry(**report["model"])
    coefficients = _coefficients_from_report(report)
    rule = report["operating_point"]["top_n_rule"]
    current = report["operating_point"]["context_length"]
    lengths = sorted({2**k for k in range(6, 1 + max(14, math.ceil(math.log2(current)) + 2))} | {current})
    curves = {design: {"area_mm2": [], "energy_per_token_nj": []} for design in DESIGNS}
    for length in lengths:
        kept = kept_keys(length, rule["top_n"], rule["top_n_ratio"], rule.get("sink_keys", 0))
        costs = _layer_costs(geometry, length, kept, coefficients)
        for design in DESIGNS:
            for metric in curves[design]:
                curves[design][metric].append(costs[design]["total"][metric] * geometry.num_layers)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric, label in (
        (axes[0], "area_mm2", "attention area, whole model (mm2)"),
        (axes[1], "energy_per_token_nj", "attention energy per token, whole model (nJ)"),
    ):
        for design, style in (("bf16", "o-"), ("had", "s-")):
            axis.plot(lengths, curves[design][metric], style, markersize=3, label=DESIGN_LABELS[design])
        axis.axvline(current, color="grey", linestyle="--", linewidth=1, label=f"n = {current}")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context length n (keys per query)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    n_rule = f"N = {rule['top_n']}" if rule["top_n"] is not None else f"N = ceil({rule['top_n_ratio']:g} n)"
    n_rule += f" + {rule['sink_keys']} sink key(s)" if rule.get("sink_keys") else ""
    figure.suptitle(f"{geometry.model_type}: HAD-CAM vs BF16 attention ({geometry.num_layers} layers, {n_rule})")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_cam_report(report: Mapping[str, Any], output_dir: str | Path, plot: bool = True) -> list[Path]:
    """Writes `cam_report.json`, `cam_report.md` and (with `plot=True`) `cam_report.png` into `output_dir`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path, plot_path = (output_dir / name for name in REPORT_FILENAMES)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    markdown_path.write_text(render_markdown(report))
    written = [json_path, markdown_path]
    if plot:
        written.append(plot_cam_report(report, plot_path))
    return written
