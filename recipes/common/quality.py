"""Readers of long-context multiple-choice reading comprehension data: QuALITY (official and L-Eval layouts), RACE.

Every layout becomes a list of `had_hf.evaluation.MultipleChoiceQuestion` (context, question, options, 0-based
answer, uid), the input of `had_hf.evaluation.multiple_choice_accuracy`.

Layouts, told apart per record by their keys:

- official QuALITY (`QuALITY.v1.0.1.htmlstripped.{train,dev,test}`, JSON lines): `article` and `questions`, each
  question with `question`, `options` (4 texts) and `gold_label` (1-based; absent in the test split),
  `question_unique_id`.
- L-Eval's QuALITY (`LEval-data/Closed-ended-tasks/quality.jsonl`): `input` (the article), `instructions` (each a
  question followed by its options on lines `(A) ...` to `(D) ...`), `outputs` (the gold option, `(B) text`).
  The file shipped in `shared/data/quality/quality.jsonl` is this layout and only a SUBSET of QuALITY: 15 articles
  with 202 of their questions (the full dev split has 2,086), so accuracies on it are not comparable to published
  QuALITY dev/test numbers and have a wide confidence interval (about +-7 points at 50%).
- RACE: one record per question (`article`, `question`, `options`, `answer` as a letter, as in the Hub dataset),
  or one per article as in the original release (`article`, `questions`, `options` and `answers` as parallel
  lists, `id`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from had_hf.evaluation import MultipleChoiceQuestion

_OPTION_LABEL = re.compile(r"\n\s*\(([A-Z])\)[ \t]*")
_GOLD_OPTION = re.compile(r"\s*\(([A-Z])\)")


def read_questions(path: str | Path) -> list[MultipleChoiceQuestion]:
    """The questions of a QuALITY (official or L-Eval layout) or RACE file: JSON lines, or one JSON value (an
    object or a list of objects)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        value = json.loads(text)
        records = value if isinstance(value, list) else [value]
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    questions = []
    for index, record in enumerate(records):
        questions.extend(questions_from_record(record, f"{Path(path).stem}-{index}"))
    return questions


def questions_from_record(record: dict[str, Any], record_id: str = "") -> list[MultipleChoiceQuestion]:
    """The questions of one record of any of the three layouts (see the module docstring)."""
    if "instructions" in record and "input" in record:
        return _from_leval(record, record_id)
    if "article" in record and isinstance(record.get("questions"), list) and "answers" in record:
        return _from_race_article(record, record_id)
    if "article" in record and isinstance(record.get("questions"), list):
        return _from_official_quality(record, record_id)
    if "article" in record and "question" in record and "options" in record:
        uid = str(record.get("example_id", record_id))
        return [_question(record["article"], record["question"], record["options"], record.get("answer"), uid)]
    raise ValueError(f"Record {record_id!r} is in no known layout; its keys are {sorted(record)}.")


def _from_official_quality(record, record_id):
    questions = []
    for index, item in enumerate(record["questions"]):
        gold = item.get("gold_label")
        answer = int(gold) - 1 if gold is not None else None
        uid = str(item.get("question_unique_id", f"{record.get('article_id', record_id)}-{index}"))
        questions.append(
            MultipleChoiceQuestion(record["article"], item["question"], list(item["options"]), answer, uid)
        )
    return questions


def _from_leval(record, record_id):
    questions = []
    outputs = record.get("outputs") or [None] * len(record["instructions"])
    for index, (instruction, output) in enumerate(zip(record["instructions"], outputs)):
        parts = _OPTION_LABEL.split(instruction)
        stem, labels, texts = parts[0].strip(), parts[1::2], [text.strip() for text in parts[2::2]]
        expected = [chr(ord("A") + i) for i in range(len(labels))]
        if len(labels) < 2 or labels != expected:
            raise ValueError(f"Question {index} of record {record_id!r} has options {labels}, expected (A), (B), ...")
        answer = None
        if output is not None:
            gold = _GOLD_OPTION.match(output)
            if gold is None:
                raise ValueError(f"Output {output!r} of record {record_id!r} does not start with an option label.")
            answer = ord(gold.group(1)) - ord("A")
        questions.append(MultipleChoiceQuestion(record["input"], stem, texts, answer, f"{record_id}-{index}"))
    return questions


def _from_race_article(record, record_id):
    uid = str(record.get("id", record_id))
    return [
        _question(record["article"], question, options, answer, f"{uid}-{index}")
        for index, (question, options, answer) in enumerate(
            zip(record["questions"], record["options"], record["answers"])
        )
    ]


def _question(article, question, options, answer, uid) -> MultipleChoiceQuestion:
    """A RACE question: `answer` is a letter (A for the first option), or None."""
    index = None
    if answer is not None:
        index = ord(str(answer).strip().upper()) - ord("A")
        if not 0 <= index < len(options):
            raise ValueError(f"Question {uid!r}: answer {answer!r} names no option of {len(options)}.")
    return MultipleChoiceQuestion(article, question, list(options), index, uid)
