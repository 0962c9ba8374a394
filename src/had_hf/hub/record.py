"""The run record of a `HADDistillationTrainer` run: what its model card needs, taken from the trainer alone.

`run_record(trainer)` returns a dict in the schema of `results.json` (the teacher and its metrics, the student's
metrics, the metrics after each stage, the stage schedule and timeline, the log history, versions), so any trainer
run can render and push a full card; a recipe adds its own fields (task, dataset, command) to the same schema.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable, Mapping
from typing import Any

RECORDED_BY = "HADDistillationTrainer"
# Trainer bookkeeping that is not a metric of the model
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "loss", "model_preparation_time")


def model_metrics(metrics: Mapping[str, Any], prefix: str = "eval_") -> dict[str, Any]:
    """The model's metrics of an evaluation log (`eval_accuracy` -> `accuracy`), without the Trainer's timing and
    loss entries."""
    return {
        key.removeprefix(prefix): value
        for key, value in metrics.items()
        if key.startswith(prefix) and not key.removeprefix(prefix).startswith(_NOT_METRICS)
    }


def metrics_per_stage(log_history: Iterable[Mapping[str, Any]], timeline: Iterable[Mapping[str, Any]]) -> list[dict]:
    """The evaluations logged at the last step of each stage: `[{stage, step, metrics}, ...]`.

    A stage left out (0 steps) ends where the one before it ends: that step keeps the earlier stage's name.
    """
    ends = {entry["end_step"]: entry["stage"] for entry in timeline if entry["end_step"] > entry["start_step"]}
    rows = []
    for entry in log_history:
        metrics = model_metrics(entry)
        if entry.get("step") in ends and metrics:
            rows.append({"stage": ends[entry["step"]], "step": entry["step"], "metrics": metrics})
    return rows


def teacher_name(trainer) -> str:
    """The teacher's Hub id or path (`config._name_or_path`; a peft student's adapter base), or a description of a
    model built in code."""
    if trainer.is_peft_student:
        student = trainer.accelerator.unwrap_model(trainer.model)
        name = student.peft_config[student.active_adapter].base_model_name_or_path
        config = student.get_base_model().config
    else:
        config = trainer.accelerator.unwrap_model(trainer.teacher).config
        name = config._name_or_path
    return name or f"a {config.model_type} model built in code (not saved)"


def run_record(trainer, *, main_metric: str | None = None, evaluate_teacher: bool = True) -> dict[str, Any]:
    """The run record of `trainer` after training, in the schema of `results.json`.

    Args:
        trainer (`HADDistillationTrainer`): a trainer that has trained.
        main_metric (`str`, *optional*): the metric the card leads with. Defaults to `metric_for_best_model`,
            else the first metric of the last evaluation that is not the loss, else the training loss.
        evaluate_teacher (`bool`, *optional*, defaults to `True`): evaluate the teacher on the eval set with the
            trainer's `compute_metrics` when it has not been (`trainer.evaluate_teacher`), so the card compares them.
    """
    import torch
    import transformers

    from .. import __version__

    log_history = trainer.state.log_history
    evaluations = [metrics for entry in log_history if (metrics := model_metrics(entry))]
    student_metrics = dict(evaluations[-1]) if evaluations else {}
    if not student_metrics:
        train_loss = next((e["train_loss"] for e in reversed(log_history) if "train_loss" in e), None)
        student_metrics = {"train_loss": train_loss} if train_loss is not None else {}
    teacher_metrics = trainer.teacher_metrics
    if teacher_metrics is None and evaluate_teacher and trainer.eval_dataset is not None and evaluations:
        teacher_metrics = trainer.evaluate_teacher()
    schedule = trainer.schedule
    return {
        "recorded_by": RECORDED_BY,
        "main_metric": _main_metric(main_metric, trainer.args.metric_for_best_model, student_metrics),
        "teacher": {"model_name_or_path": teacher_name(trainer), "metrics": teacher_metrics or {}},
        "student": {"metrics": student_metrics},
        "metrics_per_stage": metrics_per_stage(log_history, schedule.timeline()),
        "had_config": trainer.had_config.to_dict(),
        "schedule": schedule.to_dict(),
        "schedule_description": schedule.describe(),
        "stage_timeline": schedule.timeline(),
        "log_history": log_history,
        "seed": trainer.args.seed,
        "global_step": trainer.state.global_step,
        "command": shlex.join([sys.executable, *sys.argv]),
        "had_hf_version": __version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def _main_metric(requested: str | None, best_model_metric: str | None, metrics: Mapping[str, Any]) -> str | None:
    for name in (requested, best_model_metric):
        if name:
            return name.removeprefix("eval_")
    return next(iter(metrics), None)
