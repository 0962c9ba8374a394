"""The evaluation table of the causal-LM recipe: one column per model (dense teacher, exact top-N of the dense logits,
HAD converted and calibrated only, distilled HAD student), each measured the same way with `had_hf.evaluation`:
perplexity on held-out windows, top-1 agreement with the teacher on the same windows, pass-key accuracy, and QuALITY
multiple-choice accuracy, per context length where the measure has one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from had_hf.evaluation import (
    MultipleChoiceQuestion,
    multiple_choice_accuracy,
    passkey_accuracy,
    perplexity,
    top1_agreement,
)
from had_hf.integration import set_attention

from .text_data import pack_windows

logger = logging.getLogger(__name__)

COLUMNS = ("teacher", "dense_topn", "converted", "student")
COLUMN_TITLES = {
    "teacher": "dense teacher",
    "dense_topn": "exact top-N of the dense logits",
    "converted": "HAD converted + calibrated",
    "student": "HAD distilled",
}


@dataclass
class EvaluationPlan:
    """What every column is measured on.

    Attributes:
        windows: held-out token windows per context length (perplexity and top-1 agreement).
        passkey_lengths, passkey_depths, passkey_trials: the pass-key grid (`had_hf.evaluation.passkey_accuracy`).
        passkey_chat_template: wrap pass-key prompts in the tokenizer's chat template.
        questions: the multiple-choice questions (QuALITY); empty for none.
        quality_max_tokens: the most tokens of a question's scored sequence (its article is shortened to fit).
        seed: the pass-key keys' seed.
        batch_size: windows per forward pass.
    """

    windows: dict[int, list[list[int]]]
    passkey_lengths: list[int] = field(default_factory=list)
    passkey_depths: list[float] = field(default_factory=list)
    passkey_trials: int = 1
    passkey_chat_template: bool = False
    questions: list[MultipleChoiceQuestion] = field(default_factory=list)
    quality_max_tokens: int | None = None
    seed: int = 0
    batch_size: int = 1


def evaluation_windows(documents: dict[str, list[int]], length: int, count: int) -> list[list[int]]:
    """`count` windows of `length` tokens spread evenly over the documents' non-overlapping windows (each window
    inside one document); fewer where the documents hold fewer."""
    windows = pack_windows(list(documents.values()), length)
    if len(windows) <= count:
        return windows
    return [windows[(index * len(windows)) // count] for index in range(count)]


class ModelView(torch.nn.Module):
    """`model` called inside `context()`: another view of the same modules without a copy of their weights (the
    dense teacher of a model that is evaluated in another attention mode, or of a peft student with its adapter
    disabled)."""

    def __init__(self, model: torch.nn.Module, context: Callable[[], contextlib.AbstractContextManager]):
        super().__init__()
        self.model = model
        self.context = context

    def forward(self, **kwargs):
        with self.context():
            return self.model(**kwargs)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Within the block `model` runs attention `name` (e.g. `"sdpa"`); its previous attention is restored after."""
    previous = model.config._attn_implementation
    set_attention(model, name)
    try:
        yield model
    finally:
        set_attention(model, previous)


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    plan: EvaluationPlan,
    reference: torch.nn.Module | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    name: str = "model",
) -> dict:
    """One column of the table: `{"perplexity": {length: value}, "top1_agreement": {length: fraction},
    "passkey": {length: accuracy}, "passkey_per_depth": ..., "quality": {...}, "seconds": ...}`.

    Args:
        model: the causal LM to measure.
        reference: the teacher, for top-1 agreement (None: not measured).
        autocast: a context (e.g. bf16 autocast on a GPU) every measurement runs in.
    """
    start = time.perf_counter()
    column: dict = {"perplexity": {}, "top1_agreement": {}}
    with autocast():
        for length, windows in plan.windows.items():
            if not windows:
                continue
            column["perplexity"][str(length)] = perplexity(model, windows, batch_size=plan.batch_size).perplexity
            if reference is not None:
                column["top1_agreement"][str(length)] = top1_agreement(
                    model, reference, windows, batch_size=plan.batch_size
                )
        if plan.passkey_lengths and plan.passkey_depths:
            result = passkey_accuracy(
                model,
                tokenizer,
                context_lengths=plan.passkey_lengths,
                depths=plan.passkey_depths,
                trials=plan.passkey_trials,
                seed=plan.seed,
                use_chat_template=plan.passkey_chat_template,
            )
            column["passkey"] = {str(length): value for length, value in result.accuracy_per_length.items()}
            column["passkey_per_depth"] = {
                str(length): {str(depth): value for depth, value in depths.items()}
                for length, depths in result.accuracy_per_depth.items()
            }
        if plan.questions:
            result = multiple_choice_accuracy(model, tokenizer, plan.questions, plan.quality_max_tokens)
            column["quality"] = {
                "accuracy": result.accuracy,
                "accuracy_sum": result.accuracy_sum,
                "num_questions": result.num_questions,
                "num_truncated": result.num_truncated,
                "max_tokens": plan.quality_max_tokens,
            }
    column["seconds"] = round(time.perf_counter() - start, 1)
    logger.info("Evaluated %s in %.1f s: %s", name, column["seconds"], flat_metrics(column))
    return column


def flat_metrics(column: dict, main_length: int | None = None) -> dict[str, float]:
    """A column as flat `{metric: value}` (`perplexity_2048`, `passkey_2048`, `quality_accuracy`, ...), with
    `perplexity` the one at `main_length` (the model card's main metric)."""
    metrics = {}
    for measure in ("perplexity", "top1_agreement", "passkey"):
        for length, value in (column.get(measure) or {}).items():
            metrics[f"{measure}_{length}"] = value
    if column.get("quality"):
        metrics["quality_accuracy"] = column["quality"]["accuracy"]
    if main_length is not None and str(main_length) in (column.get("perplexity") or {}):
        metrics["perplexity"] = column["perplexity"][str(main_length)]
    return metrics


def perplexity_ratios(columns: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per column and context length, its perplexity over the teacher's (`ppl_ratio`)."""
    teacher = (columns.get("teacher") or {}).get("perplexity") or {}
    return {
        name: {
            length: value / teacher[length]
            for length, value in (column.get("perplexity") or {}).items()
            if teacher.get(length)
        }
        for name, column in columns.items()
        if name != "teacher"
    }


def format_table(columns: dict[str, dict], lengths: Sequence[int]) -> str:
    """The table as text: one row per measure and length, one column per model."""
    names = [name for name in COLUMNS if name in columns]
    lines = [f"{'measure':<22}" + "".join(f"{name:>14}" for name in names)]
    rows = [(f"perplexity {n}", "perplexity", str(n)) for n in lengths]
    rows += [(f"top-1 agreement {n}", "top1_agreement", str(n)) for n in lengths]
    rows += [(f"passkey {n}", "passkey", str(n)) for n in lengths]
    for title, measure, length in rows:
        values = [(columns[name].get(measure) or {}).get(length) for name in names]
        if any(value is not None for value in values):
            lines.append(f"{title:<22}" + "".join(_cell(value) for value in values))
    if any(columns[name].get("quality") for name in names):
        values = [(columns[name].get("quality") or {}).get("accuracy") for name in names]
        lines.append(f"{'QuALITY accuracy':<22}" + "".join(_cell(value) for value in values))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>14}"
    return f"{value:>14.4g}"
