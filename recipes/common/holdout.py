"""A validation split carved from a GLUE task's training split: the examples that every choice during a run is made
on (the stage-end curves, `--keep_best_deployable`), so that the dev split is evaluated only at the end."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from .glue import GlueTask, normalized_text

logger = logging.getLogger(__name__)


def split_validation(task: GlueTask, rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows): about `fraction` of `rows` held out for validation, chosen by `seed`.

    Examples with the same texts (every text field equal after `normalized_text`) go to the same side, so that no
    validation example is trained on through a duplicate; the validation part is therefore within one group of
    `fraction * len(rows)`. Both parts keep the rows' order. The same rows, fraction and seed give the same split.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"The validation fraction must be in (0, 1), got {fraction}.")
    keys = [tuple(normalized_text(row[name]) for name in task.text_fields) for row in rows]
    counts = Counter(keys)
    groups = list(counts)  # distinct texts, in order of first appearance
    target = round(fraction * len(rows))
    held, size = set(), 0
    for index in np.random.default_rng(seed).permutation(len(groups)):
        if size >= target:
            break
        held.add(groups[index])
        size += counts[groups[index]]
    if not held or len(held) == len(groups):
        raise ValueError(
            f"A validation fraction of {fraction} of {len(rows)} training examples leaves "
            f"{'no validation' if not held else 'no training'} examples: choose a fraction that keeps both non-empty."
        )
    train = [row for row, key in zip(rows, keys) if key not in held]
    validation = [row for row, key in zip(rows, keys) if key in held]
    return train, validation


def drop_shared_sentences(task: GlueTask, rows: list[dict], held_out: list[dict]) -> list[dict]:
    """`rows` without those that share a sentence (`normalized_text`) with the `held_out` examples: extra
    distillation inputs must not carry the validation split's texts, as they must not carry dev's."""
    sentences = {normalized_text(row[name]) for row in held_out for name in task.text_fields}
    sentences.discard("")
    kept = [row for row in rows if not any(normalized_text(row[name]) in sentences for name in task.text_fields)]
    if len(kept) < len(rows):
        logger.info("Extra distillation inputs: %d dropped for sharing a sentence with the validation split.",
                    len(rows) - len(kept))  # fmt: skip
    return kept
