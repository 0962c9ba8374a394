"""Pass-key retrieval: a random number hidden at a relative depth of repetitive filler text, asked for at the end.

The test of Mohtashami & Jaggi (2023, "Landmark Attention"): a causal LM that really attends over its whole context
repeats the number; one whose attention loses the distant key does not. Prompts are assembled from token ids
(instruction, filler sentences, key sentence, question), so that each prompt is exactly `context_length` tokens and
the key sits at the requested depth up to one filler sentence.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .causal_lm import (
    Progress,
    accepts_logits_to_keep,
    encode,
    evaluating,
    forward_parameters,
    model_device,
    special_prefix,
)

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
DEFAULT_DEPTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_PLACEHOLDER = "\x00CONTENT\x00"


@dataclass
class PasskeyPrompt:
    """One pass-key prompt.

    Attributes:
        input_ids: the prompt, `context_length` tokens, ending where the model should write the key.
        key: the number, as text.
        depth: the requested relative depth of the key in the filler.
        key_start: index in `input_ids` of the key sentence's first token.
        filler_start, filler_end: the filler occupies `input_ids[filler_start:filler_end]` (key sentence included).
    """

    input_ids: list[int]
    key: str
    depth: float
    key_start: int
    filler_start: int
    filler_end: int


def passkey_prompt(
    tokenizer, context_length: int, depth: float, key: str, use_chat_template: bool = False
) -> PasskeyPrompt:
    """A prompt of exactly `context_length` tokens with `key` after the filler sentence boundary nearest `depth`.

    Without `use_chat_template`: special prefix (e.g. BOS), instruction, filler with the key sentence, then
    "What is the pass key? The pass key is". With it, the instruction, filler and question are the user's message of
    the tokenizer's chat template, and the assistant's turn starts with "The pass key is".
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}.")
    instruction_ids = encode(tokenizer, INSTRUCTION)
    key_ids = encode(tokenizer, " " + KEY_SENTENCE.format(key=key))
    question_ids = encode(tokenizer, "\n" + QUESTION)
    if use_chat_template:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _PLACEHOLDER}], tokenize=False, add_generation_prompt=True
        )
        before, after = rendered.split(_PLACEHOLDER)
        prefix_ids = encode(tokenizer, before)
        suffix_ids = question_ids + encode(tokenizer, after) + encode(tokenizer, ANSWER_PREFIX)
    else:
        prefix_ids = special_prefix(tokenizer)
        suffix_ids = question_ids + encode(tokenizer, " " + ANSWER_PREFIX)
    prefix_ids = prefix_ids + instruction_ids
    filler_budget = context_length - len(prefix_ids) - len(key_ids) - len(suffix_ids)
    if filler_budget < 0:
        raise ValueError(f"context_length={context_length} is shorter than the prompt without filler.")

    sentences = [encode(tokenizer, " " + sentence) for sentence in FILLER_SENTENCES]
    target = depth * filler_budget
    before: list[int] = []
    index = 0
    # whole sentences before the key, stopping at the boundary nearest the target depth
    while True:
        sentence = sentences[index % len(sentences)]
        if len(before) + len(sentence) > filler_budget or abs(len(before) + len(sentence) - target) >= abs(
            len(before) - target
        ):
            break
        before += sentence
        index += 1
    after: list[int] = []
    while len(after) < filler_budget - len(before):
        after += sentences[index % len(sentences)]
        index += 1
    after = after[: filler_budget - len(before)]  # the last filler sentence may be cut: the length is exact

    input_ids = prefix_ids + before + key_ids + after + suffix_ids
    return PasskeyPrompt(
        input_ids=input_ids,
        key=key,
        depth=depth,
        key_start=len(prefix_ids) + len(before),
        filler_start=len(prefix_ids),
        filler_end=len(input_ids) - len(suffix_ids),
    )


def greedy_continuations(
    model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
) -> list[list[int]]:
    """Greedy decoding of `max_new_tokens` tokens after each (unpadded, equal-length) row of `input_ids`, with the
    model's KV cache. A row stops growing after `eos_token_id`."""
    kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    # transformers >= 5.2x names the cache argument and output `cache`, earlier versions `past_key_values`
    cache_name = "cache" if "cache" in forward_parameters(model) else "past_key_values"
    output = model(input_ids=input_ids, use_cache=True, **kwargs)
    generated = [[] for _ in range(input_ids.shape[0])]
    finished = [False] * input_ids.shape[0]
    for step in range(max_new_tokens):
        next_ids = output.logits[:, -1].argmax(dim=-1)
        for row, token in enumerate(next_ids.tolist()):
            if not finished[row]:
                generated[row].append(token)
                finished[row] = token == eos_token_id
        if all(finished) or step == max_new_tokens - 1:
            break
        kwargs[cache_name] = getattr(output, cache_name)
        output = model(input_ids=next_ids[:, None], use_cache=True, **kwargs)
    return generated


@dataclass
class PasskeyRecord:
    """One trial: where the key was, what the model wrote, whether its first number is the key."""

    context_length: int
    depth: float
    trial: int
    key: str
    output: str
    correct: bool


@dataclass
class PasskeyResult:
    """Pass-key accuracy overall, per context length and per (context length, depth), with every trial."""

    accuracy: float
    accuracy_per_length: dict[int, float]
    accuracy_per_depth: dict[int, dict[float, float]]
    records: list[PasskeyRecord] = field(default_factory=list)


def passkey_accuracy(
    model: torch.nn.Module,
    tokenizer,
    context_lengths: Sequence[int] = (1024, 2048, 4096, 8192),
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 5,
    seed: int = 0,
    key_digits: int = 5,
    max_new_tokens: int = 10,
    batch_size: int = 1,
    use_chat_template: bool = False,
    log_every: int = 10,
) -> PasskeyResult:
    """Pass-key retrieval accuracy of `model` at each context length and depth.

    Each (length, depth, trial) hides its own random `key_digits`-digit number, drawn from a generator seeded with
    `(seed, length, depth, trial)`: the same seed gives the same keys, whatever other lengths or depths are asked
    for. The model decodes greedily up to `max_new_tokens` tokens; a trial is correct when the first number in the
    decoded text is exactly the key.

    Args:
        model (`torch.nn.Module`): a causal LM that returns `.logits` and `.past_key_values`.
        tokenizer: its tokenizer.
        context_lengths (`list[int]`): prompt lengths in tokens.
        depths (`list[float]`): relative depths of the key in the filler, in [0, 1].
        trials (`int`, *optional*, defaults to 5): keys per (length, depth).
        batch_size (`int`, *optional*, defaults to 1): prompts per forward pass (prompts of one length have equal
            length, so no padding is needed).
        use_chat_template (`bool`, *optional*, defaults to `False`): wrap the prompt in the tokenizer's chat
            template (for instruction-tuned models).
    """
    device = model_device(model)
    records: list[PasskeyRecord] = []
    progress = Progress("passkey", len(context_lengths) * len(depths) * trials, log_every)
    with evaluating(model):
        for length in context_lengths:
            prompts = []
            for depth in depths:
                for trial in range(trials):
                    rng = random.Random(f"{seed}:{length}:{depth}:{trial}")
                    key = str(rng.randint(10 ** (key_digits - 1), 10**key_digits - 1))
                    prompts.append((trial, passkey_prompt(tokenizer, length, depth, key, use_chat_template)))
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                input_ids = torch.tensor([prompt.input_ids for _, prompt in chunk], device=device)
                continuations = greedy_continuations(model, input_ids, max_new_tokens, tokenizer.eos_token_id)
                for (trial, prompt), ids in zip(chunk, continuations):
                    output = tokenizer.decode(ids, skip_special_tokens=True)
                    number = re.search(r"\d+", output)
                    correct = number is not None and number.group(0) == prompt.key
                    records.append(PasskeyRecord(length, prompt.depth, trial, prompt.key, output, correct))
                progress.step(len(chunk))
    return summarize_passkey(records)


def summarize_passkey(records: list[PasskeyRecord]) -> PasskeyResult:
    """Accuracies of a list of trials: overall, per context length, per (context length, depth)."""
    per_depth: dict[int, dict[float, list[bool]]] = {}
    for record in records:
        per_depth.setdefault(record.context_length, {}).setdefault(record.depth, []).append(record.correct)

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    return PasskeyResult(
        accuracy=mean([record.correct for record in records]),
        accuracy_per_length={
            length: mean([c for cells in depths.values() for c in cells]) for length, depths in per_depth.items()
        },
        accuracy_per_depth={
            length: {depth: mean(cells) for depth, cells in depths.items()} for length, depths in per_depth.items()
        },
        records=records,
    )
