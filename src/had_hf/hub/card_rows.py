"""The tables and phrases of a model card, from the run record: results, metric after each stage, sigma per layer,
stage schedule, teacher, extra distillation inputs; and the number formats they use."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..config import HADConfig
from ..recipe_parser import comma_separated
from ..training_args import ATTENTION_LOSS_FIELDS, HADTrainingArguments, stage_attention_loss_weights


def teacher_row(results: Mapping[str, Any], teacher_link: str) -> str:
    """The teacher of the run: the base model, and whether and how long the run fine-tuned it, with its metric."""
    teacher = results["teacher"]
    steps = number(teacher.get("finetune_steps"))
    main = results["main_metric"]
    value = number((teacher.get("metrics") or {}).get(main))
    score = f"; {main} {value:.4f}" if value is not None else ""
    if steps is None:
        return f"{teacher_link}{score}"
    if steps == 0:
        return f"{teacher_link}, used as given (not fine-tuned in this run){score}"
    task = f"`{results['task']}`" if results.get("task") else "the task"
    return f"{teacher_link} (base model), fine-tuned on {task} in this run ({int(steps):,} steps){score}"


def distill_extra_text(dataset: Mapping[str, Any]) -> str | None:
    """The recipe's `--distill_extra_tasks` and `--distill_augment`, in words: the unlabeled inputs the student was
    distilled on beyond the task's own training texts."""
    extra = comma_separated(dataset.get("distill_extra_tasks"))
    augment = comma_separated(dataset.get("distill_augment"))
    if not extra and not augment:
        return None
    count = number(dataset.get("distill_examples"))
    own = number(dataset.get("train_examples"))
    size = f" ({int(count - own):,} examples)" if count is not None and own is not None else ""
    parts = []
    if extra:
        tasks = ", ".join(f"`{name}`" for name in extra)
        parts.append(f"the training texts of {tasks}")
    if augment:
        kinds = ", ".join(f"`{kind}`" for kind in augment)
        parts.append(f"augmented copies of the training texts ({kinds})")
    return f"{' and '.join(parts)}{size}, unlabeled (the teacher's outputs are the targets)"


def ordered_metrics(results: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The student's numeric metrics, main metric first."""
    metrics = results["student"]["metrics"]
    main = results["main_metric"]
    names = [main] + sorted(name for name in metrics if name != main)
    return [(name, float(metrics[name])) for name in names if number(metrics[name]) is not None]


def results_rows(results: Mapping[str, Any]) -> list[dict[str, str]]:
    teacher_metrics = results["teacher"].get("metrics") or {}
    rows = []
    for metric, student in ordered_metrics(results):
        teacher = number(teacher_metrics.get(metric))
        rows.append(
            {
                "metric": metric,
                "teacher": format_value(teacher),
                "student": format_value(student),
                "delta": f"{student - teacher:+.4f}" if teacher is not None else "–",
            }
        )
    return rows


def stage_rows(results: Mapping[str, Any]) -> list[dict[str, str]]:
    main = results["main_metric"]
    return [
        {"stage": entry.get("stage", "?"), "step": entry.get("step", "?"), "value": format_value(value)}
        for entry in results.get("metrics_per_stage") or []
        if (value := number((entry.get("metrics") or {}).get(main))) is not None
    ]


def model_selection_text(results: Mapping[str, Any]) -> str | None:
    """The held-out part of the training split the run evaluated its stage ends on, and the stage end it kept (the
    best deployable one with `--keep_best_deployable`, else the last); None for a run that held nothing out."""
    validation = results.get("validation")
    if not validation:
        return None
    text = (
        f"{number(validation.get('fraction')) or 0:.0%} of the training split ({validation.get('examples', '?')} "
        "examples) held out for every evaluation during the run, the stage ends' included"
    )
    selection = results.get("model_selection")
    if not selection:
        return text + "; the last stage end is the model"
    which = "an earlier stage end than the last" if selection.get("restored") else "the last stage end"
    return (
        f"{text}; the model is the stage end whose deployable {selection.get('metric', '?')} is best there "
        f"(`--keep_best_deployable`): step {selection.get('best_step', '?')}, {which}"
    )


def losses_text(results: Mapping[str, Any]) -> str | None:
    """The distillation losses of each stage, from the run's training arguments; None where they were not recorded."""
    args = results.get("training_args") or {}
    if number(args.get("attention_loss_weight")) is None:
        return None
    if args.get("attention_loss") is False:
        return "output KL alone in every stage (`--attention_loss false`)"
    fields = HADTrainingArguments.__dataclass_fields__
    recorded = (args.get(name, fields[name].default) for name in ATTENTION_LOSS_FIELDS)
    tanh, _, ste, refinement = stage_attention_loss_weights(*recorded)
    return (
        f"output KL; plus attention KL × weight: tanh and sign stages {tanh:g}, STE stage {ste:g}, "
        f"refinement stage {refinement:g}"
    )


def student_dropout_text(results: Mapping[str, Any]) -> str | None:
    """The dropout the student trained with (`--student_dropout`); None where the run did not set it."""
    dropout = number((results.get("script_args") or {}).get("student_dropout"))
    return None if dropout is None else f"{dropout:g} in every dropout layer (`--student_dropout`)"


def sigma_rows(had_config: HADConfig) -> list[dict[str, str]]:
    sigma_q, sigma_k = had_config.sigma_q or {}, had_config.sigma_k or {}
    layers = sorted(set(sigma_q) | set(sigma_k), key=_natural_key)
    return [
        {"layer": layer, "sigma_q": format_value(sigma_q.get(layer)), "sigma_k": format_value(sigma_k.get(layer))}
        for layer in layers
    ]


def timeline_rows(timeline: list[Mapping[str, Any]], schedule: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The stages with their steps and the range of c: the schedule's c_start -> c_switch in the tanh stage and
    c_switch -> c_end in the sign stage; the STE and refinement stages binarize with sign(x), where c plays no
    part (as do the first two stages of the "w/o tanh" ablation, `skip_tanh`)."""
    schedule = schedule or {}
    ranges = {}
    if all(number(schedule.get(key)) is not None for key in ("c_start", "c_switch", "c_end")):
        ranges = {
            "tanh": f"{schedule['c_start']:g} → {schedule['c_switch']:g}",
            "sign": f"{schedule['c_switch']:g} → {schedule['c_end']:g}",
        }
    rows = []
    for stage in timeline:
        name = stage.get("stage", "?")
        start, end = stage.get("start_step"), stage.get("end_step")
        if name in ("ste", "refinement", "binary") or schedule.get("skip_tanh"):
            c_range = "– (sign)"
        else:
            c_range = ranges.get(name, "not recorded")
        steps = end - start if number(start) is not None and number(end) is not None else "?"
        rows.append({"stage": name, "start": start, "end": end, "steps": steps, "c": c_range})
    return rows


def top_n_text(had_config: HADConfig) -> str:
    rule = (
        str(had_config.top_n) if had_config.top_n is not None else f"ceil({had_config.top_n_ratio} × number of keys)"
    )
    if had_config.sink_keys:
        rule += f", and the first {had_config.sink_keys} valid key(s) of each query (attention sinks)"
    return rule


def _natural_key(text: str) -> list[Any]:
    """Sorts `layer.2` before `layer.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def format_value(value: float | list[float] | None) -> str:
    if isinstance(value, (list, tuple)):
        return f"{min(value):.4f}–{max(value):.4f} ({len(value)} heads)"
    return f"{value:.4f}" if value is not None else "–"


def format_duration(seconds: Any) -> str:
    if number(seconds) is None:
        return "n/a"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
