"""Evaluation of causal language models: perplexity, top-1 agreement with a teacher, multiple-choice accuracy.

Generic code for any transformers causal LM, dense or HAD: the model is called as `model(input_ids=...,
attention_mask=...)` and only `.logits` is read. Everything runs under `torch.no_grad()` in eval mode (the model's
training mode is restored afterwards), on the device of the model's parameters, in batches, and logs its progress
through the `had_hf.evaluation` logger.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger("had_hf.evaluation")

TokenWindows = Sequence[Sequence[int]] | torch.Tensor
"""Windows of token ids: a (num_windows, length) tensor or a list of id lists (lengths may differ)."""


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside the block; each model's training mode is restored afterwards."""
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


class Progress:
    """Logs `done/total` with the elapsed time every `every` steps and at the end."""

    def __init__(self, name: str, total: int, every: int = 10):
        self.name, self.total, self.every, self.done, self.start = name, total, max(1, every), 0, time.perf_counter()

    def step(self, count: int = 1) -> None:
        self.done += count
        if self.done % self.every == 0 or self.done >= self.total:
            elapsed = time.perf_counter() - self.start
            logger.info("%s: %d/%d (%.1f s)", self.name, self.done, self.total, elapsed)


def batched_windows(
    token_windows: TokenWindows, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of the windows, right-padded with id 0 where lengths differ."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    windows = [torch.as_tensor(window, dtype=torch.long).reshape(-1) for window in token_windows]
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        length = max(len(window) for window in chunk)
        input_ids = torch.zeros(len(chunk), length, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for row, window in enumerate(chunk):
            input_ids[row, : len(window)] = window
            attention_mask[row, : len(window)] = 1
        yield input_ids.to(device), attention_mask.to(device)


def forward_parameters(model: torch.nn.Module) -> set[str]:
    """The names of the parameters of `model.forward` (empty where they cannot be read)."""
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether `model.forward` takes `logits_to_keep` (transformers' causal LMs do: only the last positions'
    logits are computed, which at long context saves a (length x vocabulary) tensor)."""
    return "logits_to_keep" in forward_parameters(model)


@dataclass
class PerplexityResult:
    """Token-level perplexity of a set of windows.

    Attributes:
        perplexity: `exp(mean_nll)`.
        mean_nll: mean negative log-likelihood (nats) over every predicted token of every window.
        num_tokens: number of predicted tokens (each window of length L predicts L - 1).
        window_nll: mean NLL of each window, in input order.
        window_tokens: predicted tokens of each window.
    """

    perplexity: float
    mean_nll: float
    num_tokens: int
    window_nll: list[float] = field(default_factory=list)
    window_tokens: list[int] = field(default_factory=list)


def perplexity(
    model: torch.nn.Module, token_windows: TokenWindows, batch_size: int = 4, log_every: int = 10
) -> PerplexityResult:
    """Token-level perplexity of `model` over windows of token ids: exp of the mean NLL of all predicted tokens.

    Each window is scored on its own (position 0 starts without context); windows of different lengths are
    right-padded and the padding is excluded. The log-softmax runs in float32 whatever the model's dtype, and the
    sums in float64.

    Args:
        model (`torch.nn.Module`): a causal LM returning `.logits` of shape (batch, length, vocabulary).
        token_windows (`list[list[int]]` or `torch.Tensor`): the windows, each at least 2 tokens long.
        batch_size (`int`, *optional*, defaults to 4): windows per forward pass; the logits of a batch take
            `batch_size * length * vocabulary * 4` bytes.
        log_every (`int`, *optional*, defaults to 10): log progress every this many batches.
    """
    device = model_device(model)
    window_nll, window_tokens = [], []
    total_nll, total_tokens = 0.0, 0
    progress = Progress("perplexity", math.ceil(len(token_windows) / batch_size), log_every)
    with evaluating(model):
        for input_ids, attention_mask in batched_windows(token_windows, batch_size, device):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            targets = input_ids[:, 1:]
            predicted = attention_mask[:, 1:].bool()
            nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
            nll = (nll.double() * predicted).sum(dim=1)
            counts = predicted.sum(dim=1)
            if bool((counts == 0).any()):
                raise ValueError("Every window needs at least 2 tokens (one predicted token).")
            window_nll.extend((nll / counts).tolist())
            window_tokens.extend(counts.tolist())
            total_nll += float(nll.sum())
            total_tokens += int(counts.sum())
            progress.step()
    if total_tokens == 0:
        raise ValueError("No windows to evaluate.")
    mean_nll = total_nll / total_tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, total_tokens, window_nll, window_tokens)


def top1_agreement(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    token_windows: TokenWindows,
    batch_size: int = 4,
    log_every: int = 10,
) -> float:
    """Fraction of positions where the student's most likely next token is the teacher's (ties: lowest id).

    Every non-padded position of every window counts, the last included. Both models must sit on the same device.
    """
    device = model_device(student)
    agree, total = 0, 0
    progress = Progress("top1_agreement", math.ceil(len(token_windows) / batch_size), log_every)
    with evaluating(student, teacher):
        for input_ids, attention_mask in batched_windows(token_windows, batch_size, device):
            student_top = student(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(dim=-1)
            teacher_top = teacher(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(dim=-1)
            counted = attention_mask.bool()
            agree += int(((student_top == teacher_top) & counted).sum())
            total += int(counted.sum())
            progress.step()
    if total == 0:
        raise ValueError("No positions to compare.")
    return agree / total


@dataclass
class MultipleChoiceQuestion:
    """A multiple-choice question over a context (a reading-comprehension article).

    Attributes:
        context: the article.
        question: the question alone (without the options).
        options: the answer options, as plain texts.
        answer: the index of the correct option (0-based), or None where the data has no label.
        uid: an identifier of the question, for reports.
    """

    context: str
    question: str
    options: list[str]
    answer: int | None = None
    uid: str = ""


PROMPT_TEMPLATE = "{context}\n\nQuestion: {question}\nAnswer:"
"""The prompt that precedes each option; `{context}` comes first and is the part that is truncated."""
OPTION_TEMPLATE = " {option}"


@dataclass
class MultipleChoiceResult:
    """Multiple-choice accuracy with both option scores.

    Attributes:
        accuracy: the primary accuracy, `accuracy_mean`.
        accuracy_mean: options ranked by the mean log-likelihood per option token (length-normalized).
        accuracy_sum: options ranked by the summed log-likelihood of the option tokens.
        num_questions: questions with an answer (the accuracies' denominator).
        num_truncated: questions whose context was shortened to fit `max_context_tokens`.
        scores_sum, scores_mean: per question, one score per option.
    """

    accuracy: float
    accuracy_mean: float
    accuracy_sum: float
    num_questions: int
    num_truncated: int
    scores_sum: list[list[float]] = field(default_factory=list)
    scores_mean: list[list[float]] = field(default_factory=list)


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. BOS), found by tokenizing with and without them."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (no warning about lengths beyond the model's maximum)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def truncate_middle_or_left(ids: list[int], budget: int, truncation: str) -> list[int]:
    """`ids` shortened to `budget` tokens: `"middle"` keeps the first and last halves, `"left"` the last tokens."""
    if len(ids) <= budget:
        return ids
    if truncation == "left":
        return ids[len(ids) - budget :] if budget > 0 else []
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head) :]


def multiple_choice_prompt(
    tokenizer,
    question: MultipleChoiceQuestion,
    max_context_tokens: int | None = None,
    truncation: str = "middle",
    prompt_template: str = PROMPT_TEMPLATE,
    option_template: str = OPTION_TEMPLATE,
) -> tuple[list[int], list[list[int]], bool]:
    """(prompt ids, ids of each option, whether the context was truncated) for one question.

    The prompt is the tokenizer's special prefix, then the template with the context tokenized on its own, so that
    the context can be cut at token level: the longest option still fits in `max_context_tokens` in all.
    """
    if truncation not in ("middle", "left"):
        raise ValueError(f"truncation must be 'middle' or 'left', got {truncation!r}.")
    head, tail = prompt_template.split("{context}")
    head_ids = encode(tokenizer, head.format(question=question.question)) if head else []
    tail_ids = encode(tokenizer, tail.format(question=question.question))
    context_ids = encode(tokenizer, question.context)
    option_ids = [encode(tokenizer, option_template.format(option=option)) for option in question.options]
    if any(len(ids) == 0 for ids in option_ids):
        raise ValueError(f"Question {question.uid!r} has an option that tokenizes to nothing.")
    prefix = special_prefix(tokenizer) + head_ids
    truncated = False
    if max_context_tokens is not None:
        budget = max_context_tokens - len(prefix) - len(tail_ids) - max(len(ids) for ids in option_ids)
        if budget < 0:
            raise ValueError(
                f"max_context_tokens={max_context_tokens} leaves no room for the context of question "
                f"{question.uid!r}: its question and longest option alone take {max_context_tokens - budget} tokens."
            )
        truncated = len(context_ids) > budget
        context_ids = truncate_middle_or_left(context_ids, budget, truncation)
    return prefix + context_ids + tail_ids, option_ids, truncated


def option_log_likelihoods(
    model: torch.nn.Module, prompt_ids: list[int], option_ids: list[list[int]]
) -> tuple[list[float], list[float]]:
    """(summed, mean per token) log-likelihood of each option's tokens after the prompt, in one batch."""
    device = model_device(model)
    lengths = [len(ids) for ids in option_ids]
    sequences = [prompt_ids + ids for ids in option_ids]
    input_ids, attention_mask = next(batched_windows(sequences, len(sequences), device))
    # the logits that predict option tokens sit at positions len(prompt) - 1 ... end - 1
    kept = input_ids.shape[1] - len(prompt_ids) + 1
    kwargs = {"logits_to_keep": kept} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits[:, -kept:-1]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    targets = input_ids[:, len(prompt_ids) :]
    token_scores = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    sums = [float(token_scores[row, :length].sum()) for row, length in enumerate(lengths)]
    return sums, [total / length for total, length in zip(sums, lengths)]


def multiple_choice_accuracy(
    model: torch.nn.Module,
    tokenizer,
    questions: Sequence[MultipleChoiceQuestion],
    max_context_tokens: int | None = None,
    truncation: str = "middle",
    prompt_template: str = PROMPT_TEMPLATE,
    option_template: str = OPTION_TEMPLATE,
    log_every: int = 10,
) -> MultipleChoiceResult:
    """Accuracy of ranking the options of each question by their log-likelihood under `model`.

    Each option is scored as the continuation of the prompt (`prompt_template` with the context and question, then
    `option_template`): the sum of its tokens' log-probabilities and that sum divided by its token count. The
    primary accuracy ranks by the mean (length-normalized): options of QuALITY-style data differ in length by tens
    of tokens, and the sum favours short options. Both are reported. Ties go to the lower option index.

    Args:
        model (`torch.nn.Module`): a causal LM.
        tokenizer: its tokenizer.
        questions (`list[MultipleChoiceQuestion]`): the questions; those without `answer` are scored, not counted.
        max_context_tokens (`int`, *optional*): the most tokens of a scored sequence (prompt plus the longest
            option); the context is shortened to fit. None: no limit.
        truncation (`str`, *optional*, defaults to `"middle"`): `"middle"` keeps the context's beginning and end,
            `"left"` keeps its end.
    """
    scores_sum, scores_mean = [], []
    correct_sum = correct_mean = answered = truncated_count = 0
    progress = Progress("multiple_choice", len(questions), log_every)
    with evaluating(model):
        for question in questions:
            prompt_ids, option_ids, truncated = multiple_choice_prompt(
                tokenizer, question, max_context_tokens, truncation, prompt_template, option_template
            )
            sums, means = option_log_likelihoods(model, prompt_ids, option_ids)
            scores_sum.append(sums)
            scores_mean.append(means)
            truncated_count += int(truncated)
            if question.answer is not None:
                answered += 1
                correct_sum += int(max(range(len(sums)), key=lambda i: (sums[i], -i)) == question.answer)
                correct_mean += int(max(range(len(means)), key=lambda i: (means[i], -i)) == question.answer)
            progress.step()
    accuracy_sum = correct_sum / answered if answered else float("nan")
    accuracy_mean = correct_mean / answered if answered else float("nan")
    return MultipleChoiceResult(
        accuracy=accuracy_mean,
        accuracy_mean=accuracy_mean,
        accuracy_sum=accuracy_sum,
        num_questions=answered,
        num_truncated=truncated_count,
        scores_sum=scores_sum,
        scores_mean=scores_mean,
    )
