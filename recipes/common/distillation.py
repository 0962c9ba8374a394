"""The two Trainers every recipe runs: the teacher's (fine-tuned first when asked, evaluated either way), then
`HADDistillationTrainer` on a HAD copy of it (`recipes.common.student`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from had_hf import HADConfig, HADDistillationTrainer

from .run_paths import teacher_license
from .student import finetune_teacher, make_student, teacher_training_arguments


@dataclass
class DistillationRun:
    """The Trainers of a finished run, the student's HADConfig, and the teacher's fine-tuning steps and metrics."""

    teacher_trainer: Trainer
    trainer: HADDistillationTrainer
    had_config: HADConfig
    train_output: TrainOutput
    teacher_steps: int
    teacher_metrics: dict

    def teacher_record(self, script_args, teacher_path: str, default_name: str) -> dict:
        """The `teacher` entry of `results.json`: the teacher as given (or `default_name`), where it was read, its
        fine-tuning steps, metrics and license."""
        return {
            "model_name_or_path": script_args.model_name_or_path or default_name,
            "path": teacher_path,
            "finetune_steps": self.teacher_steps,
            "metrics": self.teacher_metrics,
            "license": teacher_license(teacher_path),
        }


def distill(
    teacher,
    script_args,
    training_args,
    *,
    task: str,
    train_dataset,
    eval_dataset,
    distill_dataset=None,
    teacher_overrides: dict[str, Any] | None = None,
    **trainer_kwargs,
) -> DistillationRun:
    """Fine-tunes (per --finetune_teacher_epochs) and evaluates `teacher`, then distills a HAD student from it.

    Args:
        task: how the log names the task ("sst2", "the images").
        distill_dataset: the student's training data; defaults to `train_dataset` (the teacher's).
        teacher_overrides: `TrainingArguments` of the teacher's fine-tuning that differ from
            `recipes.common.student.teacher_training_arguments`.
        **trainer_kwargs: for both Trainers: `data_collator`, `processing_class`, `compute_metrics`, ...
    """
    teacher_trainer = Trainer(
        model=teacher,
        args=teacher_training_arguments(script_args, training_args, **(teacher_overrides or {})),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        **trainer_kwargs,
    )
    teacher_steps, teacher_metrics = finetune_teacher(teacher_trainer, script_args, task)
    student, teacher, had_config = make_student(teacher_trainer, script_args, training_args)
    trainer = HADDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset if distill_dataset is None else distill_dataset,
        eval_dataset=eval_dataset,
        **trainer_kwargs,
    )
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return DistillationRun(teacher_trainer, trainer, had_config, train_output, teacher_steps, teacher_metrics)
