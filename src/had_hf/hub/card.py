"""The model card of a HAD checkpoint, rendered from the run record with `huggingface_hub.ModelCard`.

The run record is `results.json` in an output folder (written by a recipe, or by
`HADDistillationTrainer.save_run_record`), or the dict `had_hf.hub.run_record(trainer)` returns; the card
describes the HADConfig stored in the folder's `config.json`, which is what users load.

The Jinja template is `hub_cards/model_card.md` at the root of the repository; the package ships it as
`had_hf/data/model_card.md`, a symbolic link to that file (one source).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..config import HADConfig
from ..plotting import TRAINING_CURVES_FILENAME, has_training_curves, plot_training_curves
from .card_rows import (
    distill_extra_text,
    format_duration,
    losses_text,
    model_selection_text,
    number,
    ordered_metrics,
    results_rows,
    sigma_rows,
    stage_rows,
    student_dropout_text,
    teacher_row,
    timeline_rows,
    top_n_text,
)
from .output_dir import CARD_FILENAME, TOKENIZER_FILES, check_results, load_had_config, load_results

logger = logging.getLogger(__name__)

TEMPLATE_FILENAME = "model_card.md"
ADAPTER_CONFIG_FILENAME = "adapter_config.json"
ATTN_IMPLEMENTATION = "hamming_topk"

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


def card_template() -> str:
    """The Jinja template of HAD model cards, from the installed package (also right in a source checkout)."""
    return resources.files("had_hf").joinpath("data", TEMPLATE_FILENAME).read_text(encoding="utf-8")


def render_model_card(
    output_dir: str | Path,
    repo_id: str | None = None,
    *,
    license: str | None = None,
    template_path: str | Path | None = None,
    results: Mapping[str, Any] | None = None,
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
        results (`dict`, *optional*):
            The run record; defaults to the folder's `results.json`.

    Returns:
        `huggingface_hub.ModelCard`: the card; `str(card)` is the README.md.
    """
    output_dir = Path(output_dir)
    results = load_results(output_dir) if results is None else check_results(dict(results))
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
    output_dir: str | Path,
    target_dir: str | Path,
    repo_id: str | None = None,
    *,
    results: Mapping[str, Any] | None = None,
    **card_kwargs,
) -> list[Path]:
    """Renders `README.md` and `training_curves.png` of `output_dir` into `target_dir`.

    `target_dir` may be `output_dir` itself (what `HADDistillationTrainer.create_model_card` wants) or a staging
    folder (what `push_to_hub` does, to leave the output folder untouched).

    Returns:
        `list[Path]`: the files written.
    """
    target_dir = Path(target_dir)
    results = load_results(output_dir) if results is None else check_results(dict(results))
    card = render_model_card(output_dir, repo_id, results=results, **card_kwargs)
    written = []
    metric = results["main_metric"]
    if has_training_curves(results.get("log_history"), metric):
        written.append(
            plot_training_curves(
                results["log_history"],
                target_dir / TRAINING_CURVES_FILENAME,
                metric=metric,
                stage_timeline=results.get("stage_timeline"),
                teacher_metric=number(results["teacher"].get("metrics", {}).get(metric)),
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
            for metric, value in ordered_metrics(results)
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
    fine_tuned = number(results["teacher"].get("finetune_steps"))
    return {
        "model_name": model_name,
        "model_ref": model_ref,
        "teacher_link": teacher_link,
        "teacher_summary": (
            f"{teacher_link} fine-tuned on `{results.get('task', 'the task')}` in this run"
            if fine_tuned
            else teacher_link
        ),
        "teacher_row": teacher_row(results, teacher_link),
        "task_label": f"Task `{results['task']}`" if results.get("task") else "The task",
        "dataset_label": _dataset_label(dataset) or "its training data",
        "dataset_source": dataset.get("source"),
        "distill_extra": distill_extra_text(dataset),
        "split": dataset.get("split"),
        "max_seq_length": results.get("max_seq_length"),
        "main_metric": results["main_metric"],
        "results_rows": results_rows(results),
        "stage_rows": stage_rows(results),
        "model_selection": model_selection_text(results),
        "losses": losses_text(results),
        "student_dropout": student_dropout_text(results),
        "had_config": had_config,
        "top_n_text": top_n_text(had_config),
        "attn_implementation": ATTN_IMPLEMENTATION,
        "sigma_rows": sigma_rows(had_config),
        "timeline_rows": timeline_rows(timeline, results.get("schedule")),
        "total_steps": max((int(s.get("end_step", 0)) for s in timeline), default="not recorded"),
        "has_curves": has_training_curves(results.get("log_history"), results["main_metric"]),
        "curves_filename": TRAINING_CURVES_FILENAME,
        "auto_class": auto_class,
        "preprocessor_class": "AutoTokenizer" if uses_tokenizer else "AutoImageProcessor",
        "preprocessor_var": "tokenizer" if uses_tokenizer else "image_processor",
        "command": results.get("command") or "# the command was not recorded in results.json",
        "seed": results.get("seed", "not recorded"),
        "wall_time": format_duration(results.get("wall_time_s")),
        "peak_memory": f"{results['peak_memory_mb']:.0f} MB" if number(results.get("peak_memory_mb")) else "n/a",
        "had_hf_version": results.get("had_hf_version", "?"),
        "transformers_version": results.get("transformers_version", "?"),
        "license_note": None,
        # a LoRA adapter (peft) output: its base is the teacher, distilled with the adapter disabled
        "adapter_base": teacher if (output_dir / ADAPTER_CONFIG_FILENAME).is_file() else None,
    }


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
    """`value` if it is a Hub repo id rather than a local path; the Hub rejects paths in metadata."""
    if not isinstance(value, str) or Path(value).exists():
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _dataset_label(dataset: Mapping[str, Any]) -> str:
    name, config = dataset.get("name"), dataset.get("config")
    if not name:
        return ""
    return f"{name} ({config})" if config else str(name)
