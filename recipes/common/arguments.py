"""The command line the distillation recipes share: teacher, HAD student and run flags (and a held-out validation
split's, for recipes that carve one), LoRA flags, and the parser.

A recipe's `ScriptArguments` subclasses `DistillationArguments` with its data flags (and its own help text for
`--model_name_or_path`, whose default teacher differs per recipe), then calls `parse_recipe_arguments`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from transformers import TrainingArguments

from had_hf import HADConfig, HADTrainingArguments
from had_hf.recipe_parser import RecipeArgumentParser

logger = logging.getLogger(__name__)


@dataclass
class DistillationArguments:
    """The teacher, the HAD student and the run: the flags every distillation recipe has."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Teacher: a local path or Hub id."})
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
        default=None, metadata={"help": "Use only this many training examples (GLUE: also this many per extra task)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many evaluation examples."})
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
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the earlier run in a non-empty --output_dir (its files are removed first; a folder "
            "that holds other files is refused). Without it, or --resume_from_checkpoint, a non-empty "
            "--output_dir is refused."
        },
    )

    def __post_init__(self):
        HADConfig(top_n=self.top_n, top_n_ratio=self.top_n_ratio)  # the rule for N: one of them, in range
        if self.teacher_batch_size < 1:
            raise ValueError(f"teacher_batch_size must be at least 1, got {self.teacher_batch_size}.")
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


@dataclass
class HoldoutArguments(DistillationArguments):
    """`DistillationArguments` with a validation split held out of the training data, for a recipe that can carve one
    (`recipes.common.distillation.distill`'s `validation_dataset`): every evaluation during the run is made on it."""

    validation_holdout_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of the training split (by --seed) for every evaluation during the run; "
            "the evaluation split (dev) is evaluated at the end only. 0: none."
        },
    )
    keep_best_deployable: bool | None = field(
        default=None,
        metadata={
            "help": "Save the stage end whose deployable model is best on the held-out split, not the last one. "
            "Default: on when a held-out split is set (--validation_holdout_fraction > 0)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.validation_holdout_fraction < 1.0:
            raise ValueError(
                f"validation_holdout_fraction must be in [0, 1) (0: no held-out part), got "
                f"{self.validation_holdout_fraction}."
            )
        if self.keep_best_deployable is None:
            self.keep_best_deployable = self.validation_holdout_fraction > 0
        elif self.keep_best_deployable and self.validation_holdout_fraction == 0:
            raise ValueError(
                "keep_best_deployable chooses among the stage ends on a held-out part of the training split: set "
                "--validation_holdout_fraction too (e.g. 0.1); choosing on dev would report a figure selected on dev."
            )


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
    lora_learning_rate_scale: float = field(
        default=10.0,
        metadata={"help": "With --use_peft, every stage's learning rate times this (1: as given)."},
    )

    def __post_init__(self):
        if not self.lora_learning_rate_scale > 0 or not math.isfinite(self.lora_learning_rate_scale):
            raise ValueError(
                f"lora_learning_rate_scale must be a finite number > 0, got {self.lora_learning_rate_scale}."
            )

    def make_student(self, model):
        """`model` (converted to HAD) wrapped with the LoRA adapter these flags describe (`make_peft_student`)."""
        from had_hf.peft_student import make_peft_student

        adapter = {k: v for k, v in asdict(self).items() if k not in ("use_peft", "lora_learning_rate_scale")}
        return make_peft_student(model, **adapter)

    def scale_learning_rates(self, training_args: HADTrainingArguments) -> None:
        """With `use_peft`, multiplies the learning rates of every stage by `lora_learning_rate_scale`, in place."""
        if not self.use_peft or self.lora_learning_rate_scale == 1:
            return
        for name in ("learning_rate", "ste_learning_rate", "refinement_learning_rate"):
            if getattr(training_args, name) is not None:
                setattr(training_args, name, getattr(training_args, name) * self.lora_learning_rate_scale)
        logger.info(
            "LoRA: learning rates x %g (--lora_learning_rate_scale): stages 1-3 %g, stage 4 %g",
            self.lora_learning_rate_scale, training_args.learning_rate, training_args.refinement_learning_rate,
        )  # fmt: skip


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
# HADTrainingArguments' own fields that --help leaves to --help_all with the TrainingArguments flags they qualify
# (use_regional_compilation and compile_dynamic_lengths go with torch_compile)
ADVANCED_HAD_FLAGS = ("use_regional_compilation", "compile_dynamic_lengths")


def help_groups(script_class: type) -> dict[str, list[str]]:
    """The sections of --help: the recipe's flags, the HAD schedule's (HADTrainingArguments' own), common ones."""
    inherited = {f.name for f in fields(TrainingArguments)}
    return {
        "recipe arguments": [f.name for f in fields(script_class)],
        "HAD schedule and losses": [
            f.name
            for f in fields(HADTrainingArguments)
            if f.name not in inherited and f.name not in ADVANCED_HAD_FLAGS
        ],
        "LoRA (peft)": [f.name for f in fields(PeftArguments)],
        "common training arguments": list(COMMON_TRAINING_FLAGS),
    }


def parse_recipe_arguments(
    script_class: type,
    argv: list[str],
    *,
    script: str,
    description: str,
    default_config: Path,
    selection_flags: Iterable[str],
    check_paths: Callable[[object, HADTrainingArguments], None] | None = None,
    defaults: dict | None = None,
) -> tuple[object, HADTrainingArguments, str]:
    """(script arguments with `.peft` set, training arguments, the command line) of a recipe.

    No arguments: the embedded default `default_config`. A YAML file first: its values, then any flags after it
    override them. Flags alone: the embedded default with the flags applied, unless one of them names the data or the
    teacher (`selection_flags`): then the library defaults with the flags. Values are validated, and `check_paths`
    (the folders the run reads and writes) runs before any model is loaded: a bad value exits with a usage error.

    Args:
        script: the recipe's path from the repository root, for the recorded command (`recipes/distill_glue.py`).
        defaults: library defaults of the recipe that differ from the dataclasses' (documented in its docstring).
    """
    parser = RecipeArgumentParser(
        (script_class, HADTrainingArguments, PeftArguments),
        default_config=default_config,
        selection_flags=selection_flags,
        help_groups=help_groups(script_class),
        description=description,
        usage="%(prog)s [CONFIG.yaml] [--flag VALUE ...]",
    )
    # a checkpoint holds the model and the optimizer state (about 3x the model): keep only the latest for resuming
    parser.set_defaults(save_total_limit=1, **(defaults or {}))
    command = " ".join([f"python {script}", *argv])
    # several processes on a machine without a GPU: HADTrainingArguments switches to CPU DDP (use_cpu) by itself
    script_args, training_args, peft_args = parser.parse(argv)
    peft_args.scale_learning_rates(training_args)
    script_args.peft = peft_args
    if check_paths is not None:
        try:
            check_paths(script_args, training_args)
        except ValueError as error:
            parser.error(str(error))
    return script_args, training_args, command
