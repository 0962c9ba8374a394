"""The folders a recipe run reads and writes: paths relative to the repository, the teacher's location and license,
the checkpoint to resume from and the output folder, all checked before any model is loaded."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from had_hf.paths import check_run_output_dir, local_folder_or_hub_id, remove_previous_run

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | None) -> str | None:
    """Relative paths in the embedded configs are relative to the repository root."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = REPO_ROOT / path
    return str(candidate) if candidate.exists() else path


def model_location(value: str, flag: str = "--model_name_or_path") -> str:
    """A model flag's folder (relative to the working directory or the repository) or Hub id; a missing local path
    is an error, never a Hub lookup."""
    return local_folder_or_hub_id(resolve_path(value), flag)


def check_teacher_or_tiny(script_args, tiny_teacher: str) -> None:
    """A given teacher must be found; without one, the recipe's tiny model built from a config (random init) is the
    teacher, which must be trained first (--finetune_teacher_epochs)."""
    if script_args.model_name_or_path is not None:
        model_location(script_args.model_name_or_path)
    elif script_args.finetune_teacher_epochs <= 0:
        raise ValueError(
            f"Without --model_name_or_path the teacher is a {tiny_teacher}: pass --finetune_teacher_epochs N to "
            "train it first, or a trained teacher."
        )


def check_output_paths(script_args, training_args) -> None:
    """Fails on a checkpoint to resume that does not exist, or an output folder the run would write over."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder.")
    check_run_output_dir(training_args.output_dir, script_args.overwrite_output_dir, checkpoint)


def clear_earlier_run(script_args, training_args, logger: logging.Logger) -> None:
    """With --overwrite_output_dir, removes the earlier run's files from the output folder (on the main process)."""
    if script_args.overwrite_output_dir and int(os.environ.get("RANK", "0")) == 0:
        removed = remove_previous_run(training_args.output_dir)
        if removed:
            logger.info("--overwrite_output_dir: removed the earlier run's %s", ", ".join(removed))


def teacher_license(teacher_path: str) -> str | None:
    """The license named in the metadata of the teacher's model card (README.md of a local folder), if any."""
    card = Path(teacher_path) / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    license = (metadata_load(card) or {}).get("license")
    return license if isinstance(license, str) else None
