"""The training-curve plot of a model card: loss terms and the eval metric against steps, stage boundaries marked.

The plot is drawn on a bare `matplotlib.figure.Figure` (never `pyplot`), so it neither needs a display nor changes
the backend of a notebook or script that calls it. matplotlib is an optional dependency (`pip install had-hf[hub]`)
and is imported only when a plot is drawn.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Series = tuple[list[float], list[float]]

TRAINING_CURVES_FILENAME = "training_curves.png"
_STAGE_COLORS = {"tanh": "#fde2c5", "sign": "#fff3b0", "ste": "#d7ecd9", "binary": "#d6e4f5"}


def loss_curves(log_history: Iterable[Mapping[str, Any]]) -> dict[str, Series]:
    """The training loss terms (`loss`, `loss_attn`, `loss_out`, ...) as `{name: (steps, values)}`.

    Only per-step training logs count: the trainer's end-of-training summary (`train_loss`) and eval logs
    (`eval_loss`) are different quantities and would distort the curves.
    """
    curves: dict[str, Series] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        for key, value in entry.items():
            if (key == "loss" or key.startswith("loss_")) and _is_number(value):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(float(entry["step"]))
                values.append(float(value))
    return curves


def metric_curve(log_history: Iterable[Mapping[str, Any]], metric: str) -> Series:
    """The eval metric (`eval_<metric>` entries of the log) as `(steps, values)`."""
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    steps, values = [], []
    for entry in log_history:
        if "step" in entry and _is_number(entry.get(key)):
            steps.append(float(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def has_training_curves(log_history: Iterable[Mapping[str, Any]] | None, metric: str) -> bool:
    """Whether `plot_training_curves` has anything to draw."""
    log_history = list(log_history or [])
    return bool(loss_curves(log_history)) or bool(metric_curve(log_history, metric)[0])


def plot_training_curves(
    log_history: Iterable[Mapping[str, Any]],
    output_path: str | Path,
    *,
    metric: str = "accuracy",
    stage_timeline: Iterable[Mapping[str, Any]] | None = None,
    teacher_metric: float | None = None,
    title: str | None = None,
) -> Path:
    """Plots the loss terms (top) and the eval metric (bottom) against the training step into a PNG.

    Args:
        log_history (`Iterable[Mapping]`):
            The trainer's `state.log_history`: training entries with `step` and `loss`/`loss_*` keys, eval entries
            with `step` and `eval_<metric>`.
        output_path (`str` or `Path`):
            Where the PNG is written (its folder must exist).
        metric (`str`, *optional*, defaults to `"accuracy"`):
            The eval metric to plot (`eval_` prefix optional).
        stage_timeline (`Iterable[Mapping]`, *optional*):
            `{"stage", "start_step", "end_step"}` entries; each stage is shaded and labelled, and its start marked
            by a vertical line.
        teacher_metric (`float`, *optional*):
            The teacher's value of the metric, drawn as a horizontal reference line.
        title (`str`, *optional*):
            The figure title.

    Returns:
        `Path`: `output_path`.

    Raises:
        `ValueError`: the log has neither loss terms nor values of the metric.
    """
    from matplotlib.figure import Figure

    log_history = list(log_history)
    losses, (metric_steps, metric_values) = loss_curves(log_history), metric_curve(log_history, metric)
    if not losses and not metric_steps:
        raise ValueError(f"Nothing to plot: the log history has no loss terms and no eval_{metric} values.")
    stages = list(stage_timeline or [])

    figure = Figure(figsize=(8, 6.5), layout="constrained")
    loss_axes, metric_axes = figure.subplots(2, 1, sharex=True)
    for name, (steps, values) in sorted(losses.items()):
        loss_axes.plot(steps, values, label=name, linewidth=1.2)
    if losses and all(v > 0 for _, values in losses.values() for v in values):
        loss_axes.set_yscale("log")  # the attention loss spans decades as the stages sharpen the binarization
    loss_axes.set_ylabel("training loss")
    if losses:
        loss_axes.legend(loc="upper right", fontsize="small")

    metric_name = metric.removeprefix("eval_")
    if metric_steps:
        metric_axes.plot(metric_steps, metric_values, marker="o", markersize=3, label=f"student eval {metric_name}")
    if teacher_metric is not None:
        metric_axes.axhline(teacher_metric, color="black", linestyle=":", linewidth=1, label="teacher")
    metric_axes.set_ylabel(f"eval {metric_name}")
    metric_axes.set_xlabel("step")
    if metric_steps or teacher_metric is not None:
        metric_axes.legend(loc="lower right", fontsize="small")

    for axes in (loss_axes, metric_axes):
        _mark_stages(axes, stages, label=axes is loss_axes)
        axes.grid(True, alpha=0.3)
    if title:
        figure.suptitle(title)
    output_path = Path(output_path)
    # No "Software" metadata: the PNG then depends only on the data, so re-pushing the same run changes nothing.
    figure.savefig(output_path, format="png", dpi=100, metadata={"Software": None})
    return output_path


def _mark_stages(axes, stages: list[Mapping[str, Any]], label: bool) -> None:
    """Shades each stage's span and draws a line at each stage boundary; names the stages on the top panel."""
    for index, stage in enumerate(stages):
        start, end, name = stage.get("start_step"), stage.get("end_step"), str(stage.get("stage", ""))
        if not (_is_number(start) and _is_number(end)):
            continue
        axes.axvspan(start, end, color=_STAGE_COLORS.get(name, "#eeeeee"), alpha=0.5, linewidth=0)
        if index > 0:
            axes.axvline(start, color="gray", linestyle="--", linewidth=0.8)
        if label:
            axes.text(
                (start + end) / 2,
                1.01,
                name,
                transform=axes.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize="small",
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
