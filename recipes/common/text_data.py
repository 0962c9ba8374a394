"""A folder of plain-text documents (the books of `shared/data/text`) as token windows for causal LM work.

Documents are split into training and held-out sets whole (never parts of one document), deterministically from a
seed; the held-out documents are for evaluation (perplexity, top-1 agreement).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def read_documents(folder: str | Path, pattern: str = "*.txt") -> dict[str, str]:
    """The documents of `folder` matching `pattern`, keyed by file stem, in sorted name order."""
    folder = Path(folder)
    paths = sorted(folder.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"No documents matching {pattern!r} in {folder}.")
    return {path.stem: path.read_text(encoding="utf-8") for path in paths}


def split_documents(
    names: Sequence[str], num_held_out: int | None = None, held_out_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(training names, held-out names): a seeded shuffle of the sorted names, the first ones held out.

    Args:
        names: document names.
        num_held_out: how many documents to hold out; default `max(1, round(held_out_fraction * len(names)))`.
        seed: the shuffle's seed; the split depends on it and on the set of names only (not their order).
    """
    ordered = sorted(names)
    if num_held_out is None:
        num_held_out = max(1, round(held_out_fraction * len(ordered)))
    if not 0 < num_held_out < len(ordered):
        raise ValueError(f"Cannot hold out {num_held_out} of {len(ordered)} documents and keep some for training.")
    random.Random(seed).shuffle(ordered)
    return sorted(ordered[num_held_out:]), sorted(ordered[:num_held_out])


def tokenize_documents(tokenizer, documents: dict[str, str]) -> dict[str, list[int]]:
    """Token ids of each document, without special tokens."""
    return {
        name: list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        for name, text in documents.items()
    }


def pack_windows(
    token_ids_list: Sequence[Sequence[int]],
    length: int,
    stride: int | None = None,
    separator_id: int | None = None,
) -> list[list[int]]:
    """Fixed-length windows of token ids: `ids[start : start + length]` for start = 0, stride, 2 * stride, ...

    Without `separator_id` each document is windowed on its own (no window crosses two documents, the evaluation
    setting); with it the documents are joined into one stream with `separator_id` after each (e.g. EOS, the
    training setting). A tail shorter than `length` is dropped.

    Args:
        token_ids_list: the documents' token ids.
        length: tokens per window.
        stride: distance between window starts; defaults to `length` (adjacent windows). Smaller values overlap.
    """
    stride = length if stride is None else stride
    if length < 1 or stride < 1:
        raise ValueError(f"length and stride must be >= 1, got {length} and {stride}.")
    if separator_id is not None:
        stream: list[int] = []
        for ids in token_ids_list:
            stream.extend(ids)
            stream.append(separator_id)
        token_ids_list = [stream]
    windows = []
    for ids in token_ids_list:
        ids = list(ids)
        windows.extend(ids[start : start + length] for start in range(0, len(ids) - length + 1, stride))
    return windows


@dataclass
class TextSplits:
    """Tokenized documents of a folder, split by document."""

    train: dict[str, list[int]]
    held_out: dict[str, list[int]]


def load_text_splits(
    folder: str | Path,
    tokenizer,
    num_held_out: int | None = None,
    held_out_fraction: float = 0.1,
    seed: int = 0,
    max_documents: int | None = None,
) -> TextSplits:
    """Reads, splits (by document, seeded) and tokenizes the `.txt` documents of `folder` (only the first
    `max_documents` in name order, when given)."""
    documents = read_documents(folder)
    if max_documents is not None:
        documents = dict(list(documents.items())[:max_documents])
    train_names, held_out_names = split_documents(list(documents), num_held_out, held_out_fraction, seed)
    return TextSplits(
        train=tokenize_documents(tokenizer, {name: documents[name] for name in train_names}),
        held_out=tokenize_documents(tokenizer, {name: documents[name] for name in held_out_names}),
    )
