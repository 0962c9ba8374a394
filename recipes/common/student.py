"""From a task-trained teacher to a HAD student ready for `HADDistillationTrainer`: the teacher's fine-tuning
arguments, the student (a copy of the teacher, or a LoRA adapter on it), its dropout, and the teacher's view of a
peft student."""

from __future__ import annotations

import contextlib
import copy
import logging
import os

import torch
from transformers import TrainingArguments

import had_hf
from had_hf import HADConfig

from .run_record import strip_metrics

logger = logging.getLogger(__name__)


def teacher_training_arguments(script_args, training_args, **overrides) -> TrainingArguments:
    """The teacher's fine-tuning (before distillation): the recipe's teacher flags, the run's precision, devices and
    logging, no checkpoints; its model goes to `<output_dir>/teacher`."""
    kwargs = dict(
        output_dir=os.path.join(training_args.output_dir, "teacher"),
        num_train_epochs=max(script_args.finetune_teacher_epochs, 0.0),
        learning_rate=script_args.teacher_learning_rate,
        per_device_train_batch_size=script_args.teacher_batch_size,
        per_device_eval_batch_size=training_args.per_device_eval_batch_size,
        warmup_steps=0.1,
        weight_decay=0.01,
        seed=training_args.seed,
        bf16=training_args.bf16,
        fp16=training_args.fp16,
        use_cpu=training_args.use_cpu,
        dataloader_num_workers=training_args.dataloader_num_workers,
        save_strategy="no",
        report_to="none",
        logging_steps=training_args.logging_steps,
        disable_tqdm=training_args.disable_tqdm,
    )
    return TrainingArguments(**{**kwargs, **overrides})


def check_task_head(loading_info: dict, teacher_path: str, script_args, task: str) -> None:
    """Exits when the teacher's task head was newly initialised (`from_pretrained(..., output_loading_info=True)`'s
    missing keys, or its mismatched ones under `ignore_mismatched_sizes`) and no fine-tuning of the teacher was asked
    for."""
    mismatched = [k if isinstance(k, str) else k[0] for k in loading_info.get("mismatched_keys", [])]
    new_head = [k for k in [*loading_info["missing_keys"], *mismatched] if "classifier" in k or "score" in k]
    if new_head and script_args.finetune_teacher_epochs <= 0:
        raise SystemExit(
            f"The teacher {teacher_path} has no task head ({new_head[:2]} newly initialised): it is not trained on "
            f"{task}. Pass --finetune_teacher_epochs N to fine-tune it first."
        )


def finetune_teacher(teacher_trainer, script_args, task: str, eval_dataset=None) -> tuple[int, dict]:
    """(fine-tuning steps, evaluation metrics) of the teacher: fine-tuned first when --finetune_teacher_epochs > 0
    (and then saved to its output folder), evaluated either way, on `eval_dataset` (default: its Trainer's)."""
    steps = 0
    if script_args.finetune_teacher_epochs > 0:
        logger.info("Fine-tuning the teacher on %s for %s epochs.", task, script_args.finetune_teacher_epochs)
        teacher_trainer.train()
        steps = teacher_trainer.state.global_step
    metrics = strip_metrics(teacher_trainer.evaluate(eval_dataset))
    if script_args.finetune_teacher_epochs > 0:
        teacher_trainer.save_model()  # every process (FSDP gathers the shards); the main process writes
    return steps, metrics


def make_student(
    teacher_trainer, script_args, training_args
) -> tuple[torch.nn.Module, torch.nn.Module | None, HADConfig]:
    """(student, teacher, HADConfig) from the teacher's Trainer after its fine-tuning.

    The student is a HAD copy of the teacher; with `--use_peft`, the teacher's own model with a LoRA adapter and
    HAD attention, whose teacher is its base with the adapter off (returned as None: no second copy is held).
    """
    student = teacher_trainer.accelerator.unwrap_model(teacher_trainer.model)
    if script_args.peft.use_peft:  # no copy: the base with its adapter disabled is the teacher
        student, teacher = student.train(), None
    else:
        student = copy.deepcopy(student).train()
        teacher = copy.deepcopy(student).eval()
    if script_args.student_dropout is not None:
        set_dropout(student, script_args.student_dropout)
    # ste_clip and sigma_per_head come from training_args: HADDistillationTrainer sets them on the student's config
    # (and warns where a HADConfig's ste_clip differs: the same value is given here)
    had_config = HADConfig(
        top_n=script_args.top_n, top_n_ratio=script_args.top_n_ratio, ste_clip=training_args.ste_clip
    )
    had_hf.convert(student, had_config)
    if script_args.peft.use_peft:
        student = script_args.peft.make_student(student)
        if script_args.finetune_teacher_epochs > 0:  # the adapter's base is the fine-tuned teacher saved before
            student.peft_config["default"].base_model_name_or_path = os.path.abspath(teacher_trainer.args.output_dir)
    return student, teacher, had_config


def set_dropout(model: torch.nn.Module, probability: float) -> int:
    """Sets every `torch.nn.Dropout` of `model` to `probability` (the attention-probability dropout of the
    transformers models reads its module's `p` too); returns how many were set."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    for module in layers:
        module.p = probability
    return len(layers)


def teacher_view(trainer):
    """A peft student shares the teacher's modules: evaluate the teacher with the adapter off and dense attention."""
    if not trainer.is_peft_student:
        return contextlib.nullcontext()
    from had_hf.peft_student import dense_teacher

    return dense_teacher(trainer.accelerator.unwrap_model(trainer.model))
