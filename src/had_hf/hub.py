"""Model cards for HAD checkpoints and pushing distillation output folders to the Hugging Face Hub.

- `render_model_card(output_dir, repo_id)` builds the card of a distillation output folder from its `results.json`
  and the HADConfig stored in its `config.json`.
- `push_to_hub(output_dir, repo_id)` validates the folder, renders the card and the training-curve plot into a
  temporary staging folder, and uploads everything in a single commit. The output folder is only read, never
  written, so it is byte-identical after a failed push; a push that did not fully land raises `HubPushError` with
  the command that retries it.
- `run_push_command(args)` runs `had-hf push OUTPUT_DIR --repo-id ORG/NAME` (its arguments are declared in
  `had_hf_cli`).

Loading needs nothing from this module: a pushed checkpoint carries its HADConfig as `quantization_config`, which
`import had_hf` teaches transformers to restore (see `had_hf.integration`).

The card template ships inside the package (`had_hf/data/model_card.md`); `hub_cards/model_card.md` at the root of
the repository is the copy people read and edit, and a test keeps the two identical.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import re
import shlex
import sys
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from .config import HADConfig
from .glue import comma_separated
from .paths import MODEL_FILE_PATTERNS
from .plotting import TRAINING_CURVES_FILENAME, has_training_curves, plot_training_curves

logger = logging.getLogger(__name__)

RESULTS_FILENAME = "results.json"
CARD_FILENAME = "README.md"
TEMPLATE_FILENAME = "model_card.md"
ADAPTER_CONFIG_FILENAME = "adapter_config.json"
ATTN_IMPLEMENTATION = "hamming_topk"

# Files of an output folder that belong on the Hub. Everything else (checkpoints, logs, optimizer states) stays local.
UPLOAD_PATTERNS = (*MODEL_FILE_PATTERNS, RESULTS_FILENAME)
TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model"}
)
PROCESSOR_FILES = frozenset({"preprocessor_config.json", "processor_config.json"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
# The Trainer pickles its TrainingArguments next to the model; it is run metadata (results.json has them as JSON),
# never uploaded and never loaded, so it is the one pickle tolerated in an output folder.
IGNORED_PICKLES = frozenset({"training_args.bin"})

# (architecture suffix, Auto class, pipeline tag): how a card tells readers to load the model, and the Hub task.
_AUTO_CLASSES = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForImageClassification", "AutoModelForImageClassification", "image-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice", "multiple-choice"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM", "text2text-generation"),
    ("ForCausalLM", "AutoModelForCausalLM", "text-generation"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
)
_TAGS = ["had", "binary-attention", "hamming-attention", "sparse-attention", "knowledge-distillation"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubError(Exception):
    """Base class of the errors of `had_hf.hub`."""


class OutputDirError(HubError, ValueError):
    """The output folder cannot be pushed as it is (nothing was sent to the Hub)."""


class HubPushError(HubError, RuntimeError):
    """A push did not land completely on the Hub. The local output folder is untouched.

    Attributes:
        step (`str`): what the push was doing when it failed (e.g. `"creating the commit"`).
        status_code (`int`, *optional*): the HTTP status the Hub answered, if it answered.
        retry_command (`str`): the `had-hf push` command that retries the push.
    """

    def __init__(self, message: str, *, step: str, retry_command: str, status_code: int | None = None):
        super().__init__(message)
        self.step = step
        self.retry_command = retry_command
        self.status_code = status_code


class _IncompleteCommitError(Exception):
    """The commit the Hub reported lacks files or holds different content."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading an output folder
# ---------------------------------------------------------------------------------------------------------------------


def load_results(output_dir: str | Path) -> dict[str, Any]:
    """Reads and checks `results.json`, the record of a distillation run written by the training recipe.

    Raises:
        `OutputDirError`: the file is missing, not JSON, or lacks what the card needs.
    """
    path = Path(output_dir) / RESULTS_FILENAME
    results = _read_json(path)
    problems = []
    if not isinstance(results.get("teacher"), dict) or not results["teacher"].get("model_name_or_path"):
        problems.append("'teacher.model_name_or_path' is missing")
    student_metrics = (results.get("student") or {}).get("metrics")
    if not isinstance(student_metrics, dict) or not student_metrics:
        problems.append("'student.metrics' is missing or empty")
    elif results.get("main_metric") not in student_metrics:
        problems.append(f"'main_metric' ({results.get('main_metric')!r}) is not one of 'student.metrics'")
    if problems:
        raise OutputDirError(f"{path} cannot describe the run: " + "; ".join(problems) + ".")
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
    return [output_dir / name for name in names if _is_uploaded(name)]


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


def _is_uploaded(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in UPLOAD_PATTERNS)


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


# ---------------------------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------------------------


def card_template() -> str:
    """The Jinja template of HAD model cards, from the installed package (also right in a source checkout)."""
    return resources.files("had_hf").joinpath("data", TEMPLATE_FILENAME).read_text(encoding="utf-8")


def render_model_card(
    output_dir: str | Path,
    repo_id: str | None = None,
    *,
    license: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """Renders the model card of a distillation output folder.

    The card's metadata holds `library_name`, `base_model` (the teacher, when it is a Hub id), `datasets`, `tags`,
    `license`, `pipeline_tag` and a `model-index` with the student's eval results. Its text explains HAD, compares
    teacher and student per metric, lists the HADConfig (N, sigma per layer, stage schedule, steps), shows the
    training curves (`training_curves.png`, see `had_hf.plotting`), and gives the loading snippet, the command that
    produced the run and the paper's citation.

    Args:
        output_dir (`str` or `Path`):
            A distillation output folder with `results.json` and a `config.json` holding the HADConfig.
        repo_id (`str`, *optional*):
            The Hub repo the card is for (`ORG/NAME`); names the model and goes in the loading snippet. Defaults to
            the folder, loaded by path.
        license (`str`, *optional*):
            The model's license. Defaults to `results.json`'s `license` (the recipe's `--license`), else the
            teacher's license recorded there (`teacher.license`, read from the teacher's model card), which a
            distilled model inherits, else `"other"` with a note that the teacher's license applies.
        template_path (`str` or `Path`, *optional*):
            A custom Jinja template (same variables as `hub_cards/model_card.md`).

    Returns:
        `huggingface_hub.ModelCard`: the card; `str(card)` is the README.md.
    """
    output_dir = Path(output_dir)
    results = load_results(output_dir)
    config, had_config = load_had_config(output_dir)
    _warn_on_config_mismatch(results, had_config)
    model_ref = repo_id or str(output_dir)
    model_name = (repo_id or output_dir.resolve().name).split("/")[-1]
    teacher_license = results["teacher"].get("license")
    license = license or results.get("license") or teacher_license
    auto_class, pipeline_tag = _auto_class(config)
    card_data = _card_data(results, model_name, pipeline_tag, license or "other")
    context = _card_context(output_dir, results, had_config, model_ref, model_name, auto_class)
    if not license:
        context["license_note"] = (
            f"License: this card says `other` because the run did not record one; the model is derived from "
            f"{context['teacher_link']} and its license applies."
        )
    elif license == teacher_license:
        context["license_note"] = (
            f"License: `{license}`, the license of the teacher {context['teacher_link']}, which the distilled model "
            "inherits (`had-hf push --license` sets another)."
        )
    template = Path(template_path).read_text(encoding="utf-8") if template_path is not None else card_template()
    return ModelCard.from_template(card_data, template_str=template, **context)


def write_card_files(
    output_dir: str | Path, target_dir: str | Path, repo_id: str | None = None, **card_kwargs
) -> list[Path]:
    """Renders `README.md` and `training_curves.png` of `output_dir` into `target_dir`.

    `target_dir` may be `output_dir` itself (what `HADDistillationTrainer.create_model_card` wants) or a staging
    folder (what `push_to_hub` does, to leave the output folder untouched).

    Returns:
        `list[Path]`: the files written.
    """
    target_dir = Path(target_dir)
    card = render_model_card(output_dir, repo_id, **card_kwargs)
    written = []
    results = load_results(output_dir)
    metric = results["main_metric"]
    if has_training_curves(results.get("log_history"), metric):
        written.append(
            plot_training_curves(
                results["log_history"],
                target_dir / TRAINING_CURVES_FILENAME,
                metric=metric,
                stage_timeline=results.get("stage_timeline"),
                teacher_metric=_number(results["teacher"].get("metrics", {}).get(metric)),
                title=f"HAD distillation: {results.get('task', '')} ({metric})",
            )
        )
    card_path = target_dir / CARD_FILENAME
    card.save(card_path)
    written.append(card_path)
    return written


def _card_data(results: Mapping[str, Any], model_name: str, pipeline_tag: str | None, license: str) -> ModelCardData:
    dataset = results.get("dataset") or {}
    dataset_id = _hub_id(dataset.get("source")) or _hub_id(dataset.get("name"))
    eval_results = None
    if dataset_id and pipeline_tag:
        eval_results = [
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=dataset_id,
                dataset_name=_dataset_label(dataset),
                dataset_config=dataset.get("config"),
                dataset_split=dataset.get("split"),
                metric_type=metric,
                metric_value=value,
            )
            for metric, value in _ordered_metrics(results)
        ]
    return ModelCardData(
        library_name="had_hf",
        base_model=_hub_id(results["teacher"]["model_name_or_path"]),
        datasets=[dataset_id] if dataset_id else None,
        tags=list(_TAGS),
        license=license,
        pipeline_tag=pipeline_tag,
        model_name=model_name,
        eval_results=eval_results,
    )


def _card_context(
    output_dir: Path,
    results: Mapping[str, Any],
    had_config: HADConfig,
    model_ref: str,
    model_name: str,
    auto_class: str,
) -> dict[str, Any]:
    dataset = results.get("dataset") or {}
    teacher = str(results["teacher"]["model_name_or_path"])
    teacher_id = _hub_id(teacher)
    uses_tokenizer = any((output_dir / name).is_file() for name in TOKENIZER_FILES)
    timeline = list(results.get("stage_timeline") or [])
    teacher_link = f"[`{teacher}`](https://huggingface.co/{teacher})" if teacher_id else f"`{teacher}`"
    fine_tuned = _number(results["teacher"].get("finetune_steps"))
    return {
        "model_name": model_name,
        "model_ref": model_ref,
        "teacher_link": teacher_link,
        "teacher_summary": (
            f"{teacher_link} fine-tuned on `{results.get('task', 'the task')}` in this run"
            if fine_tuned
            else teacher_link
        ),
        "teacher_row": _teacher_row(results, teacher_link),
        "task_label": f"Task `{results['task']}`" if results.get("task") else "The task",
        "dataset_label": _dataset_label(dataset) or "its training data",
        "dataset_source": dataset.get("source"),
        "distill_extra": _distill_extra_text(dataset),
        "split": dataset.get("split"),
        "max_seq_length": results.get("max_seq_length"),
        "main_metric": results["main_metric"],
        "results_rows": _results_rows(results),
        "stage_rows": _stage_rows(results),
        "had_config": had_config,
        "top_n_text": _top_n_text(had_config),
        "attn_implementation": ATTN_IMPLEMENTATION,
        "sigma_rows": _sigma_rows(had_config),
        "timeline_rows": _timeline_rows(timeline, results.get("schedule")),
        "total_steps": max((int(s.get("end_step", 0)) for s in timeline), default="not recorded"),
        "has_curves": has_training_curves(results.get("log_history"), results["main_metric"]),
        "curves_filename": TRAINING_CURVES_FILENAME,
        "auto_class": auto_class,
        "preprocessor_class": "AutoTokenizer" if uses_tokenizer else "AutoImageProcessor",
        "preprocessor_var": "tokenizer" if uses_tokenizer else "image_processor",
        "command": results.get("command") or "# the command was not recorded in results.json",
        "seed": results.get("seed", "not recorded"),
        "wall_time": _format_duration(results.get("wall_time_s")),
        "peak_memory": f"{results['peak_memory_mb']:.0f} MB" if _number(results.get("peak_memory_mb")) else "n/a",
        "had_hf_version": results.get("had_hf_version", "?"),
        "transformers_version": results.get("transformers_version", "?"),
        "license_note": None,
        # a LoRA adapter (peft) output: its base is the teacher, distilled with the adapter disabled
        "adapter_base": teacher if (output_dir / ADAPTER_CONFIG_FILENAME).is_file() else None,
    }


def _teacher_row(results: Mapping[str, Any], teacher_link: str) -> str:
    """The teacher of the run: the base model, and whether and how long the run fine-tuned it, with its metric."""
    teacher = results["teacher"]
    steps = _number(teacher.get("finetune_steps"))
    main = results["main_metric"]
    value = _number((teacher.get("metrics") or {}).get(main))
    score = f"; {main} {value:.4f}" if value is not None else ""
    if steps is None:
        return f"{teacher_link}{score}"
    if steps == 0:
        return f"{teacher_link}, used as given (not fine-tuned in this run){score}"
    task = f"`{results['task']}`" if results.get("task") else "the task"
    return f"{teacher_link} (base model), fine-tuned on {task} in this run ({int(steps):,} steps){score}"


def _distill_extra_text(dataset: Mapping[str, Any]) -> str | None:
    """The recipe's `--distill_extra_tasks` and `--distill_augment`, in words: the unlabeled inputs the student was
    distilled on beyond the task's own training texts."""
    extra = comma_separated(dataset.get("distill_extra_tasks"))
    augment = comma_separated(dataset.get("distill_augment"))
    if not extra and not augment:
        return None
    count = _number(dataset.get("distill_examples"))
    own = _number(dataset.get("train_examples"))
    size = f" ({int(count - own):,} examples)" if count is not None and own is not None else ""
    parts = []
    if extra:
        tasks = ", ".join(f"`{name}`" for name in extra)
        parts.append(f"the training texts of {tasks}")
    if augment:
        kinds = ", ".join(f"`{kind}`" for kind in augment)
        parts.append(f"augmented copies of the training texts ({kinds})")
    return f"{' and '.join(parts)}{size}, unlabeled (the teacher's outputs are the targets)"


def _ordered_metrics(results: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The student's numeric metrics, main metric first."""
    metrics = results["student"]["metrics"]
    main = results["main_metric"]
    names = [main] + sorted(name for name in metrics if name != main)
    return [(name, float(metrics[name])) for name in names if _number(metrics[name]) is not None]


def _results_rows(results: Mapping[str, Any]) -> list[dict[str, str]]:
    teacher_metrics = results["teacher"].get("metrics") or {}
    rows = []
    for metric, student in _ordered_metrics(results):
        teacher = _number(teacher_metrics.get(metric))
        rows.append(
            {
                "metric": metric,
                "teacher": _format_value(teacher),
                "student": _format_value(student),
                "delta": f"{student - teacher:+.4f}" if teacher is not None else "–",
            }
        )
    return rows


def _stage_rows(results: Mapping[str, Any]) -> list[dict[str, str]]:
    main = results["main_metric"]
    return [
        {"stage": entry.get("stage", "?"), "step": entry.get("step", "?"), "value": _format_value(value)}
        for entry in results.get("metrics_per_stage") or []
        if (value := _number((entry.get("metrics") or {}).get(main))) is not None
    ]


def _sigma_rows(had_config: HADConfig) -> list[dict[str, str]]:
    sigma_q, sigma_k = had_config.sigma_q or {}, had_config.sigma_k or {}
    layers = sorted(set(sigma_q) | set(sigma_k), key=_natural_key)
    return [
        {"layer": layer, "sigma_q": _format_value(sigma_q.get(layer)), "sigma_k": _format_value(sigma_k.get(layer))}
        for layer in layers
    ]


def _timeline_rows(timeline: list[Mapping[str, Any]], schedule: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The stages with their steps and the range of c: the schedule's c_start -> c_switch in the tanh stage and
    c_switch -> c_end in the sign stage; the STE and refinement stages binarize with sign(x), where c plays no
    part (as do the first two stages of the "w/o tanh" ablation, `skip_tanh`)."""
    schedule = schedule or {}
    ranges = {}
    if all(_number(schedule.get(key)) is not None for key in ("c_start", "c_switch", "c_end")):
        ranges = {
            "tanh": f"{schedule['c_start']:g} → {schedule['c_switch']:g}",
            "sign": f"{schedule['c_switch']:g} → {schedule['c_end']:g}",
        }
    rows = []
    for stage in timeline:
        name = stage.get("stage", "?")
        start, end = stage.get("start_step"), stage.get("end_step")
        if name in ("ste", "refinement", "binary") or schedule.get("skip_tanh"):
            c_range = "– (sign)"
        else:
            c_range = ranges.get(name, "not recorded")
        steps = end - start if _number(start) is not None and _number(end) is not None else "?"
        rows.append({"stage": name, "start": start, "end": end, "steps": steps, "c": c_range})
    return rows


def _warn_on_config_mismatch(results: Mapping[str, Any], had_config: HADConfig) -> None:
    """The card describes config.json (what users load); say so when results.json recorded something else."""
    recorded = results.get("had_config")
    if not isinstance(recorded, dict):
        return
    current = had_config.to_dict()
    differing = sorted(
        key for key in ("top_n", "top_n_ratio", "sigma_q", "sigma_k") if recorded.get(key) != current[key]
    )
    if differing:
        logger.warning(
            "results.json records a HADConfig that differs from config.json in %s; the card describes config.json.",
            differing,
        )


def _auto_class(config: Mapping[str, Any]) -> tuple[str, str | None]:
    for architecture in config.get("architectures") or []:
        for suffix, auto_class, pipeline_tag in _AUTO_CLASSES:
            if architecture.endswith(suffix):
                return auto_class, pipeline_tag
    return "AutoModel", None


def _hub_id(value: Any) -> str | None:
    """`value` if it looks like a Hub repo id rather than a local path; the Hub rejects paths in metadata."""
    if not isinstance(value, str) or not _HUB_ID.fullmatch(value) or ".." in value or Path(value).exists():
        return None
    return value


def _dataset_label(dataset: Mapping[str, Any]) -> str:
    name, config = dataset.get("name"), dataset.get("config")
    if not name:
        return ""
    return f"{name} ({config})" if config else str(name)


def _top_n_text(had_config: HADConfig) -> str:
    if had_config.top_n is not None:
        return str(had_config.top_n)
    return f"ceil({had_config.top_n_ratio} × number of keys)"


def _natural_key(text: str) -> list[Any]:
    """Sorts `layer.2` before `layer.10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _format_value(value: float | list[float] | None) -> str:
    if isinstance(value, (list, tuple)):
        return f"{min(value):.4f}–{max(value):.4f} ({len(value)} heads)"
    return f"{value:.4f}" if value is not None else "–"


def _format_duration(seconds: Any) -> str:
    if _number(seconds) is None:
        return "n/a"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


# ---------------------------------------------------------------------------------------------------------------------
# Pushing
# ---------------------------------------------------------------------------------------------------------------------


def retry_command(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
) -> str:
    """The `had-hf push` command that redoes a push with the same options (the token is left out: it is read from the
    environment)."""
    parts = ["had-hf", "push", str(output_dir), "--repo-id", repo_id]
    if private:
        parts.append("--private")
    if revision is not None:
        parts += ["--revision", revision]
    if license is not None:
        parts += ["--license", license]
    if commit_message is not None:
        parts += ["--commit-message", commit_message]
    return shlex.join(parts)


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    *,
    license: str | None = None,
) -> str:
    """Pushes a distillation output folder to the Hub in one commit, with its model card and training curves.

    The folder is validated first (see `check_output_dir`); the card and plot are rendered into a temporary
    staging folder, and the folder's own files are only read. Uploaded: the safetensors weights, `config.json`,
    tokenizer or image-processor files, `results.json`, `README.md` (the card) and `training_curves.png`; a
    `README.md` or `training_curves.png` already in the folder is replaced by the generated one, and other files
    (checkpoints, logs) stay local. After the commit, the repo's file list at that commit is checked against what
    was sent, so a push that landed partially is reported as a failure, never as a success.

    Args:
        output_dir (`str` or `Path`): the output folder of a distillation run.
        repo_id (`str`): the Hub repo, `ORG/NAME`; created if it does not exist.
        token (`str`, *optional*): a Hub token with write access; defaults to `HF_TOKEN` or the saved login.
        private (`bool`, *optional*, defaults to `False`): create the repo private (an existing repo keeps its
            visibility).
        commit_message (`str`, *optional*): the commit's title.
        revision (`str`, *optional*): the branch to commit to (created from `main` if missing); defaults to `main`.
        license (`str`, *optional*): the model's license for the card (see `render_model_card`).

    Returns:
        `str`: the URL of the commit.

    Raises:
        `OutputDirError`: the folder cannot be pushed (nothing was sent).
        `HubPushError`: the Hub could not be reached, refused the token (401/403), failed (5xx), or the commit is
            incomplete. The message says which, and gives the command that retries.
    """
    output_dir = Path(output_dir)
    retry = retry_command(
        output_dir, repo_id, private=private, revision=revision, license=license, commit_message=commit_message
    )
    if not _REPO_ID.fullmatch(repo_id or ""):
        raise OutputDirError(f"--repo-id must be ORG/NAME (a user or organization, a slash, a name), got {repo_id!r}.")
    files = check_output_dir(output_dir)
    results = load_results(output_dir)
    with tempfile.TemporaryDirectory(prefix="had_hf_push_") as staging:
        generated = write_card_files(output_dir, staging, repo_id, license=license)
        generated_names = {path.name for path in generated}
        sources = [path for path in files if path.name not in generated_names] + generated
        message = commit_message or f"Upload HAD student of {results['teacher']['model_name_or_path']}"
        return _upload(repo_id, sources, token, private, message, revision, output_dir, retry)


def _upload(
    repo_id: str,
    sources: list[Path],
    token: str | None,
    private: bool,
    commit_message: str,
    revision: str | None,
    output_dir: Path,
    retry: str,
) -> str:
    """Creates the repo (and branch) and commits `sources` at the repo root; maps any failure to `HubPushError`."""
    api = HfApi(token=token)
    step = "creating the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "uploading the files (one commit)"
        # `create_commit`, not `upload_folder`: with hf_xet installed, `upload_folder` may split a large folder into
        # several commits, and a failure between them would leave a half-pushed model on the branch.
        operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in sources]
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
        step = f"checking commit {commit.oid}"
        _verify_commit(api, repo_id, commit.oid, operations)
    except Exception as error:  # any failure: the user needs the same two facts, what failed and how to retry
        raise _push_error(error, step, api.endpoint, repo_id, output_dir, retry) from error
    logger.info("Pushed %s to %s: %s", output_dir, repo_id, commit.commit_url)
    return commit.commit_url


def _verify_commit(api: HfApi, repo_id: str, commit_oid: str, operations: list[CommitOperationAdd]) -> None:
    """Raises `_IncompleteCommitError` unless every uploaded file is in the commit with the same content.

    A successful commit answer is not proof enough: the Hub leaves out files its `.gitignore` rules match, and a
    commit could be cut short. Sizes and content hashes come from the tree listing (sha256 for LFS files, the git
    blob id for regular ones), so nothing is downloaded; the sha256 is the one the client computed to upload.
    """
    remote = {entry.path: entry for entry in api.list_repo_tree(repo_id, revision=commit_oid, recursive=True)}
    missing, different = [], []
    for operation in operations:
        entry = remote.get(operation.path_in_repo)
        if entry is None or not hasattr(entry, "size"):
            missing.append(operation.path_in_repo)
        elif not _same_content(operation, entry):
            different.append(operation.path_in_repo)
    if missing or different:
        details = []
        if missing:
            details.append(f"missing {missing}")
        if different:
            details.append(f"different content in {different}")
        raise _IncompleteCommitError(
            f"the Hub reported commit {commit_oid} but it is incomplete: {'; '.join(details)}"
        )


def _same_content(operation: CommitOperationAdd, entry: Any) -> bool:
    size = operation.upload_info.size
    lfs = getattr(entry, "lfs", None)
    if lfs is not None:
        return lfs.size == size and lfs.sha256 == operation.upload_info.sha256.hex()
    return entry.size == size and entry.blob_id == _git_blob_id(Path(operation.path_or_fileobj))


def _git_blob_id(path: Path) -> str:
    """The git object id of a file, which the Hub reports for regular (non-LFS, small) files."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _push_error(
    error: BaseException, step: str, endpoint: str, repo_id: str, output_dir: Path, retry: str
) -> HubPushError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    reason = _failure_reason(error, status, endpoint, repo_id)
    if isinstance(error, _IncompleteCommitError):
        outcome = "That commit is not a successful push; pushing again uploads what is missing or different."
    else:
        outcome = "The Hub confirmed no commit of these files, so nothing counts as pushed."
    message = (
        f"Pushing {output_dir} to {repo_id} failed while {step}: {reason}\n"
        f"{outcome} The local folder {output_dir} was not modified.\n"
        f"Retry with:\n    {retry}"
    )
    return HubPushError(message, step=step, retry_command=retry, status_code=status)


def _failure_reason(error: BaseException, status: int | None, endpoint: str, repo_id: str) -> str:
    if isinstance(error, _IncompleteCommitError):
        return str(error) + "."
    if status == 401:
        return (
            "the Hub rejected the token (HTTP 401). Pass a valid token with write access via --token or HF_TOKEN, "
            "or log in with `hf auth login`."
        )
    if status == 403:
        namespace = repo_id.split("/")[0]
        return f"the token may not write to {namespace!r} (HTTP 403). Use a token with write access to {namespace!r}."
    if status == 404:
        return "the Hub found no such repository or branch for this token (HTTP 404)."
    if status is not None and status >= 500:
        return f"the Hub answered HTTP {status}, a server-side error; it is usually temporary."
    if status is not None:
        server_message = getattr(error, "server_message", None) or str(error).splitlines()[0]
        return f"the Hub answered HTTP {status}: {server_message}"
    return f"could not complete the request to {endpoint} ({type(error).__name__}: {error})."


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def run_push_command(args: argparse.Namespace) -> int:
    """Runs `had-hf push`: prints the commit URL and returns 0, or prints the error to stderr and returns 1."""
    try:
        url = push_to_hub(
            args.output_dir,
            args.repo_id,
            token=args.token,
            private=args.private,
            commit_message=args.commit_message,
            revision=args.revision,
            license=args.license,
        )
    except (HubError, ImportError) as error:  # ImportError: the `hub` extra (jinja2, matplotlib) is missing
        print(f"had-hf push: error: {error}", file=sys.stderr)
        if isinstance(error, ImportError):
            print("had-hf push needs the hub extra: pip install 'had-hf[hub]'", file=sys.stderr)
        return 1
    print(url)
    return 0
