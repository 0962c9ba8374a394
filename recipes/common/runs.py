"""What the distillation recipes share about a run: the LoRA flags, paths relative to the repository, the teacher's
license, the per-stage metrics and the peak memory recorded in `results.json`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[2]

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

    def make_student(self, model):
        """`model` (converted to HAD) wrapped with the LoRA adapter these flags describe (`make_peft_student`)."""
        from had_hf.peft_student import make_peft_student

        return make_peft_student(model, **{k: v for k, v in asdict(self).items() if k != "use_peft"})


def resolve_path(path: str | None) -> str | None:
    """Relative paths in the embedded configs are relative to the repository root."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = REPOSITORY / path
    return str(candidate) if candidate.exists() else path


def teacher_license(teacher_path: str) -> str | None:
    """The license named in the metadata of the teacher's model card (README.md of a local folder), if any."""
    card = Path(teacher_path) / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    license = (metadata_load(card) or {}).get("license")
    return license if isinstance(license, str) else None


def strip_metrics(metrics: dict) -> dict:
    """Evaluation metrics without their `eval_` prefix and without the Trainer's timing and loss entries."""
    drop = ("runtime", "samples_per_second", "steps_per_second", "epoch", "loss")
    return {k.removeprefix("eval_"): v for k, v in metrics.items() if not k.removeprefix("eval_").startswith(drop)}


def metrics_per_stage(trainer, schedule) -> list[dict]:
    """The evaluations logged at the end of each stage, named by the stage that ended."""
    # a stage left out (0 steps) ends where the one before it ends: that step keeps the earlier stage's name
    ends = {
        entry["end_step"]: entry["stage"] for entry in schedule.timeline() if entry["end_step"] > entry["start_step"]
    }
    rows = []
    for entry in trainer.state.log_history:
        if entry.get("step") in ends and any(k.startswith("eval_") for k in entry):
            rows.append({"stage": ends[entry["step"]], "step": entry["step"], "metrics": strip_metrics(entry)})
    return rows


def peak_memory_mb() -> float:
    """The run's peak memory: the CUDA allocator's peak on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: kilobytes
