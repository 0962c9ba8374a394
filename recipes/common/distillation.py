"""The two Trainers every recipe runs: the teacher's (fine-tuned first when asked, evaluated either way), then
`HADDistillationTrainer` on a HAD copy of it (`recipes.common.student`); with a validation split held out of the
training data, every evaluation during the run is made on it, and the best deployable stage end can be kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from had_hf import HADConfig, HADDistillationTrainer
from had_hf.callbacks import BestDeployableCallback
from had_hf.trainer import DEPLOYABLE_PREFIX

from .run_paths import teacher_license
from .run_record import strip_metrics
from .stage_pace import StagePaceCallback
from .student import finetune_teacher, make_student, teacher_training_arguments

# the split carved from the training split (`validation_dataset`), and the prefix of its evaluations
VALIDATION = "validation"


@dataclass
class DistillationRun:
    """The Trainers of a finished run, the student's HADConfig, the teacher's fine-tuning steps and metrics, the
    split evaluated during the run, the held-out split's record (None without one), the stage end kept (None
    unless --keep_best_deployable) and where the time went in each stage (`recipes.common.stage_pace`)."""

    teacher_trainer: Trainer
    trainer: HADDistillationTrainer
    had_config: HADConfig
    train_output: TrainOutput
    teacher_steps: int
    teacher_metrics: dict
    evaluation_split: str = "eval"
    validation: dict | None = None
    model_selection: dict | None = None
    stage_pace: dict | None = None

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
    validation_dataset=None,
    eval_split: str = "eval",
    main_metric: str | None = None,
    teacher_overrides: dict[str, Any] | None = None,
    **trainer_kwargs,
) -> DistillationRun:
    """Fine-tunes (per --finetune_teacher_epochs) and evaluates `teacher`, then distills a HAD student from it.

    Args:
        task: how the log names the task ("sst2", "the images").
        eval_dataset: the split the teacher's metrics are measured on (the recipe's evaluation split, `eval_split`).
        distill_dataset: the student's training data; defaults to `train_dataset` (the teacher's).
        validation_dataset: a part held out of the training split (`script_args` then a
            `recipes.common.arguments.HoldoutArguments`): every evaluation during the run, the stage ends' included,
            is made on it, and teacher and student are evaluated on it too; `eval_dataset` is left to the recipe's
            evaluation after training. With --keep_best_deployable the best deployable stage end on it (by
            `main_metric`, larger is better) is the trained student.
        teacher_overrides: `TrainingArguments` of the teacher's fine-tuning that differ from
            `recipes.common.student.teacher_training_arguments`.
        **trainer_kwargs: for both Trainers: `data_collator`, `processing_class`, `compute_metrics`, ...
    """
    during_run = eval_dataset if validation_dataset is None else validation_dataset
    teacher_trainer = Trainer(
        model=teacher,
        args=teacher_training_arguments(script_args, training_args, **(teacher_overrides or {})),
        train_dataset=train_dataset,
        eval_dataset=during_run,
        **trainer_kwargs,
    )
    teacher_steps, teacher_metrics = finetune_teacher(teacher_trainer, script_args, task, eval_dataset)
    teacher_validation = None
    if validation_dataset is not None:  # before the student exists: a peft student shares the teacher's modules
        teacher_validation = _evaluate_validation(teacher_trainer, validation_dataset)
    student, teacher, had_config = make_student(teacher_trainer, script_args, training_args)
    trainer = HADDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset if distill_dataset is None else distill_dataset,
        eval_dataset=during_run,
        **trainer_kwargs,
    )
    keeper = None
    if validation_dataset is not None and script_args.keep_best_deployable:
        if main_metric is None:
            raise ValueError("--keep_best_deployable needs the recipe's main metric (distill's main_metric).")
        keeper = BestDeployableCallback(f"{DEPLOYABLE_PREFIX}_{main_metric}", trainer.had_config)
        trainer.add_callback(keeper)
    pace = StagePaceCallback(trainer.schedule)
    trainer.add_callback(pace)
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    run = DistillationRun(
        teacher_trainer, trainer, had_config, train_output, teacher_steps, teacher_metrics, eval_split
    )
    run.stage_pace = pace.summary()
    if validation_dataset is not None:
        run.evaluation_split = VALIDATION
        run.validation = {
            "examples": len(validation_dataset),
            "fraction": script_args.validation_holdout_fraction,
            "teacher_metrics": teacher_validation,
            "student_metrics": _evaluate_validation(trainer, validation_dataset),
        }
        run.model_selection = keeper.summary() if keeper else None
    return run


def _evaluate_validation(trainer: Trainer, dataset) -> dict:
    """`trainer`'s model on the held-out split, logged under its own prefix (not a stage end's `eval_`)."""
    return strip_metrics(trainer.evaluate(dataset, metric_key_prefix=VALIDATION), VALIDATION)
