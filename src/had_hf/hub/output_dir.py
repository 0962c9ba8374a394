"""A distillation output folder as the Hub sees it: the run record (`results.json`), the HADConfig in `config.json`,
and which files go to the Hub.

The errors of `had_hf.hub` are defined here, since every step starts by reading the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub.utils import filter_repo_objects

from ..config import HADConfig
from ..paths import MODEL_FILE_PATTERNS

RESULTS_FILENAME = "results.json"
CARD_FILENAME = "README.md"

# Files of an output folder that belong on the Hub (the `allow_patterns` of an upload). Everything else
# (checkpoints, logs, optimizer states) stays local.
UPLOAD_PATTERNS = (*MODEL_FILE_PATTERNS, RESULTS_FILENAME)
TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model"}
)
PROCESSOR_FILES = frozenset({"preprocessor_config.json", "processor_config.json"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
# The Trainer pickles its TrainingArguments next to the model; it is run metadata (results.json has them as JSON),
# never uploaded and never loaded, so it is the one pickle tolerated in an output folder.
IGNORED_PICKLES = frozenset({"training_args.bin"})


class HubError(Exception):
    """Base class of the errors of `had_hf.hub`."""


class OutputDirError(HubError, ValueError):
    """The output folder cannot be pushed as it is (nothing was sent to the Hub)."""


def load_results(output_dir: str | Path) -> dict[str, Any]:
    """Reads and checks `results.json`, the record of a distillation run (written by a recipe, or by
    `HADDistillationTrainer.save_run_record`).

    Raises:
        `OutputDirError`: the file is missing, not JSON, or lacks what the card needs.
    """
    path = Path(output_dir) / RESULTS_FILENAME
    return check_results(_read_json(path), str(path))


def check_results(results: dict[str, Any], source: str = "the run record") -> dict[str, Any]:
    """Returns `results` if it holds what a model card needs (the teacher, the student's metrics and the main
    metric among them).

    Raises:
        `OutputDirError`: naming every missing piece.
    """
    problems = []
    if not isinstance(results.get("teacher"), dict) or not results["teacher"].get("model_name_or_path"):
        problems.append("'teacher.model_name_or_path' is missing")
    student_metrics = (results.get("student") or {}).get("metrics")
    if not isinstance(student_metrics, dict) or not student_metrics:
        problems.append("'student.metrics' is missing or empty")
    elif results.get("main_metric") not in student_metrics:
        problems.append(f"'main_metric' ({results.get('main_metric')!r}) is not one of 'student.metrics'")
    if problems:
        raise OutputDirError(f"{source} cannot describe the run: " + "; ".join(problems) + ".")
    return results


def load_had_config(output_dir: str | Path) -> tuple[dict[str, Any], HADConfig]:
    """Reads `config.json` and the HADConfig stored in it as `quantization_config`.

    Returns:
        `tuple[dict, HADConfig]`: the whole model config and its validated HADConfig.

    Raises:
        `OutputDirError`: no `config.json`, no HADConfig in it, or an invalid one.
    """
    path = Path(output_dir) / "config.json"
    config = _read_json(path)
    quantization_config = config.get("quantization_config")
    if not isinstance(quantization_config, dict) or quantization_config.get("quant_method") != "had":
        raise OutputDirError(
            f"{path} has no HADConfig (a `quantization_config` with quant_method 'had'): this is not a HAD "
            "checkpoint. Convert the model with `had_hf.convert(model, HADConfig(...))` before `save_pretrained`."
        )
    try:
        had_config = HADConfig.from_dict(quantization_config)
    except (TypeError, ValueError) as error:
        raise OutputDirError(f"{path} holds an invalid HADConfig: {error}") from error
    return config, had_config


def check_output_dir(output_dir: str | Path) -> list[Path]:
    """Checks that an output folder can be pushed and returns the files that go to the Hub.

    A pushable folder has safetensors weights (and no pickled ones), a `config.json` with a HADConfig, a tokenizer or
    an image processor, and a `results.json`. All problems are reported at once.

    Raises:
        `OutputDirError`: listing every problem found.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise OutputDirError(f"{output_dir} is not a folder.")
    names = sorted(path.name for path in output_dir.iterdir() if path.is_file())
    problems = _weight_problems(output_dir, names)
    if not TOKENIZER_FILES.intersection(names) and not PROCESSOR_FILES.intersection(names):
        problems.append(
            "no tokenizer or image processor files (e.g. tokenizer.json, tokenizer_config.json or "
            "preprocessor_config.json): save it next to the model with `save_pretrained(output_dir)`"
        )
    for loader in (load_had_config, load_results):
        try:
            loader(output_dir)
        except OutputDirError as error:
            problems.append(str(error))
    if problems:
        bullet_list = "\n".join(f"  - {problem}" for problem in problems)
        raise OutputDirError(f"{output_dir} cannot be pushed:\n{bullet_list}")
    return [output_dir / name for name in filter_repo_objects(names, allow_patterns=list(UPLOAD_PATTERNS))]


def _weight_problems(output_dir: Path, names: list[str]) -> list[str]:
    problems = []
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES) and name not in IGNORED_PICKLES]
    if pickles:
        problems.append(
            f"pickle files {pickles}: HAD checkpoints are pushed as safetensors only, so that loading never "
            "unpickles. Re-save the model with `model.save_pretrained(output_dir)` (safetensors) and move the "
            "pickle files out of the folder"
        )
    if not any(name.endswith(".safetensors") for name in names):
        problems.append("no *.safetensors weights: save the model with `model.save_pretrained(output_dir)`")
    for index_name in (name for name in names if name.endswith(".safetensors.index.json")):
        shards = set(_read_json(output_dir / index_name).get("weight_map", {}).values())
        missing = sorted(shards.difference(names))
        if missing:
            problems.append(f"{index_name} lists shards that are missing: {missing}")
    return problems


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise OutputDirError(f"{path} is missing.") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OutputDirError(f"{path} cannot be read as JSON: {error}") from error
    if not isinstance(data, dict):
        raise OutputDirError(f"{path} must hold a JSON object.")
    return data
