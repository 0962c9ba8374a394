"""GLUE tasks for the distillation recipe: the official TSV layout or the Hub dataset, extra distillation inputs and
augmentations (the metrics are in `recipes.common.glue_metrics`).

Columns and label encodings follow the Hub dataset `nyu-mll/glue`, so both sources give identical examples.
"""

from __future__ import annotations

import csv
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from had_hf.recipe_parser import comma_separated

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str  # directory in the official GLUE distribution
    text_fields: tuple[str, ...]
    labels: tuple[str, ...] | None  # label strings in the TSV files, in the Hub dataset's order; None: regression
    main_metric: str
    eval_splits: tuple[str, ...] = ("dev",)
    header: bool = True

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def placeholder_label(self) -> float | int:
        """The label of an unlabeled distillation input: of the task's label type, so that it batches with the
        task's own examples; the distillation loss never reads it."""
        return 0.0 if self.is_regression else 0


TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "CoLA", ("sentence",), ("0", "1"), "matthews_correlation", header=False),
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), ("0", "1"), "accuracy"),
    "mrpc": GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("0", "1"), "f1"),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), None, "pearson"),
    "qqp": GlueTask("qqp", "QQP", ("question1", "question2"), ("0", "1"), "accuracy"),
    "mnli": GlueTask(
        "mnli",
        "MNLI",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        "accuracy",
        eval_splits=("dev_matched", "dev_mismatched"),
    ),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), "accuracy"),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy"),
    "wnli": GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("0", "1"), "accuracy"),
}

# TSV column names of each task's text and label in the official files (CoLA has no header: indices).
_TSV_COLUMNS: dict[str, tuple[tuple[str | int, ...], str | int]] = {
    "cola": ((3,), 1),
    "sst2": (("sentence",), "label"),
    "mrpc": (("#1 String", "#2 String"), "Quality"),
    "stsb": (("sentence1", "sentence2"), "score"),
    "qqp": (("question1", "question2"), "is_duplicate"),
    "mnli": (("sentence1", "sentence2"), "gold_label"),
    "qnli": (("question", "sentence"), "label"),
    "rte": (("sentence1", "sentence2"), "label"),
    "wnli": (("sentence1", "sentence2"), "label"),
}

# Text columns of test files that differ from the training file's (CoLA's test file: index, sentence).
_TSV_TEST_TEXT_COLUMNS: dict[str, tuple[str | int, ...]] = {"cola": (1,)}

# Hub dataset split names of the evaluation splits.
_HUB_SPLITS = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[key]


def read_glue_tsv(glue_dir: str | Path, task: GlueTask, split: str, max_rows: int | None = None) -> list[dict]:
    """Examples of `split` ("train", "dev", "dev_matched", ...) from the official GLUE layout.

    Returns dicts with the task's text fields and an integer `label` (a float for STS-B), encoded as in the Hub
    dataset. Rows with the wrong number of fields (a few in QQP) or without a label are skipped.
    """
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1 (or None for all rows), got {max_rows}.")
    path = Path(glue_dir) / task.folder / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: --glue_dir must hold the official GLUE layout (<TASK>/{split}.tsv)."
        )
    text_columns, label_column = _TSV_COLUMNS[task.name]
    examples = []
    for record in _tsv_records(path, task, whole_rows=True):
        label = record.get(label_column)
        if label in (None, "", "-"):
            continue
        example = {field: record[column] for field, column in zip(task.text_fields, text_columns)}
        example["label"] = float(label) if task.is_regression else task.labels.index(label)
        examples.append(example)
        if max_rows is not None and len(examples) >= max_rows:
            break
    if not examples:
        raise ValueError(f"No labelled examples read from {path}.")
    return examples


def _tsv_records(path: Path, task: GlueTask, whole_rows: bool):
    """The rows of an official GLUE TSV file as dicts keyed by its header's column names (by column index for
    CoLA's headerless files); `whole_rows` skips the rows whose field count differs from the header's."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader) if task.header else None
        for row in reader:
            if whole_rows and header is not None and len(row) != len(header):
                continue
            yield dict(zip(header, row)) if header is not None else dict(enumerate(row))


def load_glue(
    task: GlueTask, glue_dir: str | Path | None = None, max_train: int | None = None, max_eval: int | None = None
) -> dict[str, list[dict]]:
    """ "train" and the task's evaluation splits as lists of examples, from `glue_dir` or the Hub dataset.

    Lists keep the TSV path free of the `datasets` library (the Trainer takes any sequence of examples); the Hub
    path needs it.
    """
    if glue_dir is not None:
        splits = {"train": read_glue_tsv(glue_dir, task, "train", max_train)}
        for split in task.eval_splits:
            splits[split] = read_glue_tsv(glue_dir, task, split, max_eval)
        return splits
    hub = _hub_dataset(task)
    splits = {}
    for split, source, limit in [("train", "train", max_train)] + [
        (split, _HUB_SPLITS[split], max_eval) for split in task.eval_splits
    ]:
        rows = hub[source]
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        splits[split] = [{**{f: row[f] for f in task.text_fields}, "label": row["label"]} for row in rows]
    return splits


def _hub_dataset(task: GlueTask):
    """The task's Hub dataset (`nyu-mll/glue`), all splits."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("Loading GLUE from the Hub needs `pip install datasets` (or pass --glue_dir).") from error
    return datasets.load_dataset("nyu-mll/glue", task.name)


def normalized_text(text: str) -> str:
    """A sentence reduced to its lowercase letters and digits: GLUE tasks that share sentences (MRPC and STS-B's
    MSRpar pairs) write them with different spacing around punctuation."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def held_out_sentences(task: GlueTask, glue_dir: str | Path | None = None) -> set[str]:
    """The normalized sentences of `task`'s evaluation and test splits (`normalized_text`): texts that must not
    reach its distillation as extra inputs, since its student is measured on them."""
    splits = [*task.eval_splits, *(("test_matched", "test_mismatched") if task.name == "mnli" else ("test",))]
    if glue_dir is None:
        hub = _hub_dataset(task)
        columns = [hub[_HUB_SPLITS.get(split, split)][field] for split in splits for field in task.text_fields]
        texts = (text for column in columns for text in column)
    else:
        texts = _tsv_texts(glue_dir, task, splits)
    sentences = {normalized_text(text) for text in texts}
    sentences.discard("")  # a sentence of punctuation alone would match every other one
    return sentences


def _tsv_texts(glue_dir: str | Path, task: GlueTask, splits: list[str]):
    """The texts of `splits` of the official GLUE files, labelled or not (test files have no labels); a missing test
    file is skipped with a warning, a missing dev file is an error."""
    for split in splits:
        path = Path(glue_dir) / task.folder / f"{split}.tsv"
        if not path.is_file():
            if split.startswith("test"):  # only for GLUE-server submissions: checked when present
                logger.warning("%s not found: extra distillation inputs are checked against the dev split only.", path)
                continue
            raise FileNotFoundError(
                f"{path} not found: --glue_dir must hold the official GLUE layout (extra distillation inputs are "
                "checked against the task's dev sentences)."
            )
        columns = _TSV_COLUMNS[task.name][0]
        if split.startswith("test"):
            columns = _TSV_TEST_TEXT_COLUMNS.get(task.name, columns)
        # every row, even a short one: a held-out sentence must not slip through a malformed line
        for record in _tsv_records(path, task, whole_rows=False):
            yield from (record[column] for column in columns if record.get(column))


def extra_task_sources(task: GlueTask, sources: str | list[str] | None) -> list[GlueTask]:
    """The GLUE tasks named in `sources` (comma-separated) whose training texts can be extra distillation inputs of
    `task`: other tasks, each named once, with as many text fields as `task`. Raises `ValueError` otherwise."""
    names = comma_separated(sources)
    source_tasks = [get_task(name) for name in names]
    chosen = [source.name for source in source_tasks]
    repeated = sorted({name for name in chosen if chosen.count(name) > 1})
    if repeated:
        raise ValueError(f"Extra distillation tasks repeat in {names} ({repeated}): name each task once.")
    for name, source in zip(names, source_tasks):
        if source.name == task.name:
            raise ValueError(f"{name!r} is the task itself; extra distillation inputs must come from other tasks.")
        if len(source.text_fields) != len(task.text_fields):
            allowed = sorted(
                t for t, v in TASKS.items() if len(v.text_fields) == len(task.text_fields) and t != task.name
            )
            raise ValueError(
                f"{name!r} has {len(source.text_fields)} text field(s) and {task.name!r} has {len(task.text_fields)}: "
                f"its texts cannot stand in for {task.name}'s inputs. Allowed sources: {allowed}."
            )
    return source_tasks


def missing_glue_files(glue_dir: str | Path, task: GlueTask, extra_tasks: list[GlueTask] = ()) -> list[Path]:
    """The files of the official GLUE layout that a run on `task` reads and `glue_dir` lacks: the task's training
    and evaluation splits, and the training split of every extra task."""
    needed = [(task, split) for split in ("train", *task.eval_splits)] + [(extra, "train") for extra in extra_tasks]
    paths = [Path(glue_dir) / source.folder / f"{split}.tsv" for source, split in needed]
    return [path for path in paths if not path.is_file()]


def extra_distillation_inputs(
    task: GlueTask, sources: str | list[str], glue_dir: str | Path | None = None, max_rows: int | None = None
) -> list[dict]:
    """The training texts of other GLUE tasks as extra, unlabeled inputs for distilling a `task` student.

    Distillation needs no labels: its targets are the teacher's outputs. Each source's text fields are renamed, in
    order, to `task`'s, so a sentence-pair task takes only sentence-pair sources. The examples carry the placeholder
    label 0 (0.0 for regression) so that they batch with the task's own examples; the distillation loss never reads
    it. `max_rows` caps each source.

    GLUE tasks share sentences: STS-B's MSRpar pairs come from the MRPC corpus, so MRPC's training set holds some of
    STS-B's dev pairs and the other way round. Any source example with a sentence of `task`'s dev or test splits
    (`held_out_sentences`) is dropped, so that the student is never distilled on what it is measured on.
    """
    names = comma_separated(sources)
    source_tasks = extra_task_sources(task, names)
    held_out = held_out_sentences(task, glue_dir) if names else set()  # read once every name is known to be usable
    examples: list[dict] = []
    for source in source_tasks:
        if glue_dir is not None:
            rows = read_glue_tsv(glue_dir, source, "train", max_rows)
        else:
            rows = load_glue(source, None, max_rows, 0)["train"]
        dropped = 0
        for row in rows:
            texts = {field: row[source_field] for field, source_field in zip(task.text_fields, source.text_fields)}
            if any(normalized_text(text) in held_out for text in texts.values()):
                dropped += 1
                continue
            examples.append({**texts, "label": task.placeholder_label})
        logger.info(
            "Extra distillation inputs from %s: %d kept, %d dropped for sharing a sentence with %s's dev or test "
            "splits.", source.name, len(rows) - dropped, dropped, task.name,
        )  # fmt: skip
    return examples


# kinds of augmented copies for distillation inputs; the pair-only ones need two text fields
AUGMENTATIONS = {
    "swap": "each pair with its two texts in the other order",
    "cross": "each first text with the second text of another example (unrelated pairs)",
    "word_drop": "each text with every word dropped with probability 0.15 (at least one word kept)",
}
PAIR_AUGMENTATIONS = ("swap", "cross")


def task_augmentations(task: GlueTask) -> list[str]:
    """Every augmentation kind `task` takes (`--distill_augment all`): the pair-only ones for sentence-pair tasks."""
    return [kind for kind in AUGMENTATIONS if len(task.text_fields) == 2 or kind not in PAIR_AUGMENTATIONS]


def augmentation_kinds(task: GlueTask, kinds: str | list[str] | None) -> list[str]:
    """The augmentation kinds named in `kinds` (comma-separated): known ones (AUGMENTATIONS), each named once, the
    pair-only ones for sentence-pair tasks alone. Raises `ValueError` otherwise."""
    names = comma_separated(kinds)
    for name in names:
        if name not in AUGMENTATIONS:
            raise ValueError(f"Unknown augmentation {name!r}; choose from {sorted(AUGMENTATIONS)}.")
        if name in PAIR_AUGMENTATIONS and len(task.text_fields) != 2:
            allowed = sorted(set(AUGMENTATIONS) - set(PAIR_AUGMENTATIONS))
            raise ValueError(
                f"Augmentation {name!r} needs sentence pairs and {task.name!r} has one text field; allowed: {allowed}."
            )
    if len(names) != len(set(names)):
        raise ValueError(f"Augmentations repeat in {names}: name each kind once.")
    return names


def augmented_distillation_inputs(
    task: GlueTask, examples: list[dict], kinds: str | list[str], seed: int = 0, drop_probability: float = 0.15
) -> list[dict]:
    """Augmented copies of `examples` as extra, unlabeled distillation inputs: one copy per kind (AUGMENTATIONS).

    Distillation targets are the teacher's outputs, so a text the teacher was never trained on still teaches the
    student to follow the teacher. Each copy is made from `examples` themselves (kinds do not compose) and carries
    the placeholder label 0 (0.0 for regression). Seeded: the same arguments give the same copies.
    """
    names = augmentation_kinds(task, kinds)
    if "cross" in names and len(examples) < 2:
        raise ValueError(
            f"'cross' pairs each example with another one: it needs at least 2 examples, got {len(examples)}."
        )
    rng = np.random.default_rng(seed)
    placeholder = task.placeholder_label
    fields = task.text_fields
    copies: list[dict] = []
    for name in names:
        if name == "swap":
            copies += [{fields[0]: e[fields[1]], fields[1]: e[fields[0]], "label": placeholder} for e in examples]
        elif name == "cross":
            # a random cycle through the examples: every example gives and takes one second text, never its own
            order = rng.permutation(len(examples))
            partner = np.empty_like(order)
            partner[order] = np.roll(order, -1)
            copies += [
                {fields[0]: e[fields[0]], fields[1]: examples[partner[i]][fields[1]], "label": placeholder}
                for i, e in enumerate(examples)
            ]
        else:
            copies += [
                {**{f: _drop_words(e[f], rng, drop_probability) for f in fields}, "label": placeholder}
                for e in examples
            ]
    return copies


def _drop_words(text: str, rng: np.random.Generator, probability: float) -> str:
    words = text.split()
    if not words:
        return text
    keep = rng.random(len(words)) >= probability
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(word for word, kept in zip(words, keep) if kept)
