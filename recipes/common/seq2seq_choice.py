"""Multiple-choice reading comprehension for an encoder-decoder model (T5), at a fixed context length.

The encoder reads `question: ... options: (A) ... (B) ... context: <article>`, cut to `context_length` tokens (the
article's beginning is kept) and padded to exactly that length, so that every batch has `context_length` keys and
`N = ceil(ratio * context_length)` holds for each encoder query. Training rows have the gold option as the decoder's
target; for evaluation each option is a row of its own, scored by the log-likelihood of its tokens as the decoder's
target (summed, and divided by its length), and the best-scoring option is the answer.
"""

from __future__ import annotations

import numpy as np
import torch

from had_hf.evaluation import MultipleChoiceQuestion
from had_hf.evaluation.causal_lm import encode

INPUT_TEMPLATE = "question: {question} options: {options} context: "
IGNORE_INDEX = -100


def encoder_input(
    tokenizer, question: MultipleChoiceQuestion, context_length: int, eos_id: int
) -> tuple[dict[str, list[int]], bool]:
    """(`input_ids` and `attention_mask` of exactly `context_length` tokens, whether the article was cut)."""
    options = " ".join(f"({chr(ord('A') + index)}) {option}" for index, option in enumerate(question.options))
    head = encode(tokenizer, INPUT_TEMPLATE.format(question=question.question, options=options))
    context = encode(tokenizer, question.context)
    budget = context_length - 1 - len(head)
    ids = (head + context[: max(budget, 0)])[: context_length - 1] + [eos_id]
    padding = context_length - len(ids)
    return {
        "input_ids": ids + [tokenizer.pad_token_id] * padding,
        "attention_mask": [1] * len(ids) + [0] * padding,
    }, len(context) > max(budget, 0)


def target_labels(tokenizer, text: str, max_answer_length: int, eos_id: int) -> list[int]:
    """The decoder's target: `text`'s tokens and EOS, cut to `max_answer_length`, padded with -100 (ignored)."""
    ids = encode(tokenizer, text)[: max_answer_length - 1] + [eos_id]
    return ids + [IGNORE_INDEX] * (max_answer_length - len(ids))


def training_rows(
    tokenizer, questions: list[MultipleChoiceQuestion], context_length: int, max_answer_length: int, eos_id: int
) -> list[dict]:
    """One row per question with an answer: the encoder input and the gold option as the target."""
    rows = []
    for question in questions:
        if question.answer is None:
            continue
        inputs, _ = encoder_input(tokenizer, question, context_length, eos_id)
        labels = target_labels(tokenizer, question.options[question.answer], max_answer_length, eos_id)
        rows.append({**inputs, "labels": labels})
    return rows


def scoring_rows(
    tokenizer, questions: list[MultipleChoiceQuestion], context_length: int, max_answer_length: int, eos_id: int
) -> tuple[list[dict], list[tuple[int, int]], int]:
    """(rows, per question (number of options, answer), questions whose article was cut): one row per option of
    every question with an answer, the question's rows consecutive."""
    rows, groups, truncated = [], [], 0
    for question in questions:
        if question.answer is None:
            continue
        inputs, cut = encoder_input(tokenizer, question, context_length, eos_id)
        truncated += int(cut)
        for option in question.options:
            rows.append({**inputs, "labels": target_labels(tokenizer, option, max_answer_length, eos_id)})
        groups.append((len(question.options), question.answer))
    return rows, groups, truncated


def option_log_likelihoods(logits, labels: torch.Tensor) -> torch.Tensor:
    """(summed log-likelihood of each row's target tokens, their number): shape (rows, 2). For the Trainer's
    `preprocess_logits_for_metrics`, so that only two numbers per row, not the vocabulary's logits, are gathered."""
    if isinstance(logits, tuple):  # a dense model's outputs beside the logits (e.g. the encoder's hidden states)
        logits = logits[0]
    valid = labels != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    token_scores = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    return torch.stack([token_scores.sum(-1), valid.sum(-1).float()], dim=-1)


def choice_accuracies(scores: np.ndarray, groups: list[tuple[int, int]]) -> dict[str, float]:
    """Accuracy of picking the option with the highest mean log-likelihood per token (`accuracy`, the primary one:
    options differ in length) and with the highest sum (`accuracy_sum`). Ties go to the first option."""
    if len(scores) != sum(count for count, _ in groups):
        raise ValueError(f"{len(scores)} option scores for {sum(c for c, _ in groups)} options.")
    correct_mean = correct_sum = 0
    start = 0
    for count, answer in groups:
        sums, lengths = scores[start : start + count, 0], scores[start : start + count, 1]
        correct_mean += int(np.argmax(sums / np.maximum(lengths, 1)) == answer)
        correct_sum += int(np.argmax(sums) == answer)
        start += count
    return {"accuracy": correct_mean / len(groups), "accuracy_sum": correct_sum / len(groups)}
