"""Checks of the folders a command reads and writes, made before any model is loaded.

- `local_folder_or_hub_id`: a model argument names an existing folder or a Hub repo id; a missing local path is
  reported as one, not as a bad Hub id, and is never looked up on the Hub.
- `check_run_output_dir`: a training run writes into an empty or new folder, unless the user asks to overwrite an
  earlier run (`--overwrite_output_dir`) or resumes one (`--resume_from_checkpoint`), as transformers' example
  scripts do.
- `remove_previous_run`: what overwriting removes: the files an earlier run wrote, nothing else.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from pathlib import Path

# The files of a saved model (weights, configs, adapter, tokenizer, processor): what `had-hf push` uploads, and part
# of what a run writes.
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "adapter_config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# What a distillation run writes into its output folder: the model and tokenizer (`save_model`), the Trainer's
# checkpoints, arguments, state and logs, the recipe's results and teacher, and the model card with its plot.
RUN_OUTPUT_PATTERNS = (
    *MODEL_FILE_PATTERNS,
    "training_args.bin",
    "trainer_state.json",
    "*results.json",
    "README.md",
    "training_curves.png",
    "checkpoint-*",
    "teacher",
    "runs",
)
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def local_folder_or_hub_id(value: str, flag: str) -> str:
    """`value` as a model location: an existing local folder (with `~` expanded), or else a Hub repo id.

    Raises `ValueError` naming `flag` when `value` is a file, a local path that does not exist (it starts with `./`,
    `../`, `/` or `~`, or its first component exists here, as in a typo of `outputs/run`), or neither an existing
    folder nor a valid Hub repo id.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{flag} {value}: is a file; a model is a folder (with config.json) or a Hub repo id.")
    if _looks_like_local_path(value):
        raise ValueError(f"{flag} {value}: no such local folder ({path.absolute()} does not exist).")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(f"{flag} {value}: no such local folder, and not a Hub repo id (NAME or ORG/NAME).") from None
    return value


def _looks_like_local_path(value: str) -> bool:
    if value in (".", "..") or value.startswith(("./", "../", "/", "~")):
        return True
    first, separator, _ = value.partition(os.sep)
    return bool(separator) and Path(first).exists()


def check_run_output_dir(output_dir: str | os.PathLike, overwrite: bool, resume_from_checkpoint: str | None) -> None:
    """Raises `ValueError` unless a run may write into `output_dir`.

    Allowed: a new or empty folder; a non-empty one with `resume_from_checkpoint` (the run continues there) or with
    `overwrite` when it holds only an earlier run's files (`RUN_OUTPUT_PATTERNS`), which the run then removes.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder.")
    entries = sorted(entry.name for entry in path.iterdir()) if path.is_dir() else []
    if not entries:
        return
    if overwrite and resume_from_checkpoint:
        raise ValueError(
            "--overwrite_output_dir removes the earlier run that --resume_from_checkpoint continues: pass one of them."
        )
    if resume_from_checkpoint:
        return
    if overwrite:
        others = [name for name in entries if not is_run_output(name)]
        if others:
            raise ValueError(
                f"--overwrite_output_dir removes an earlier run's files, and {output_dir} also holds {others}, which "
                "no run writes: move them, or choose another --output_dir. Nothing was removed."
            )
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    resume = last_checkpoint(path)
    raise ValueError(
        f"--output_dir {output_dir} exists and is not empty ({shown}). Choose another folder, pass "
        "--overwrite_output_dir to replace the earlier run's files"
        + (f", or --resume_from_checkpoint {resume} to continue that run." if resume else ".")
    )


def is_run_output(name: str) -> bool:
    """Whether `name`, an entry of an output folder, is something a distillation run writes there."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_OUTPUT_PATTERNS)


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The Trainer checkpoint of `output_dir` with the highest step (`checkpoint-<step>`), or None."""
    path = Path(output_dir)
    steps = {
        int(match.group(1)): entry
        for entry in (path.iterdir() if path.is_dir() else [])
        if entry.is_dir() and (match := _CHECKPOINT.fullmatch(entry.name))
    }
    return steps[max(steps)] if steps else None


def remove_previous_run(output_dir: str | os.PathLike) -> list[str]:
    """Removes the entries of `output_dir` that a run writes (`is_run_output`); returns their names.

    Call it after `check_run_output_dir` accepted `overwrite`: that check refuses a folder holding anything else.
    """
    path = Path(output_dir)
    removed = []
    for entry in sorted(path.iterdir()) if path.is_dir() else []:
        if not is_run_output(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed
