"""Distillation across processes under Accelerate: two processes against one, on the same data and steps.

Parts: `glue` runs `recipes/distill_glue.py` with DDP (`recipes/accelerate_configs/ddp_2proc.yaml`); `causal_lm` runs
`recipes/distill_causal_lm.py` with FSDP2 (`fsdp2_2proc.yaml`), when that recipe exists and `--causal_lm_args` gives
its flags. Each part runs the recipe once on one process and once on two, and records the final metric of each, the
throughput ratio (scaling efficiency) and the peak memory of every process; parts merge into one `--out` file.

    # on a machine with 2 GPUs, one command per part (each under 9 minutes on H200s); the data and an fp16 MiniLM
    # carried in .carry/ (python benchmarks/glue_gpu.py prepare_carry --glue_dir ../shared/data/glue --dest .carry)
    python benchmarks/multi_gpu.py --parts glue --glue_dir .carry/glue --teacher .carry/minilm
    python benchmarks/multi_gpu.py --parts causal_lm --causal_lm_args "--max_steps 200 ..."
    # CPU smoke (2 gloo processes, a tiny random teacher; tests/test_benchmarks.py runs it)
    python benchmarks/multi_gpu.py --smoke --out /tmp/multi_gpu.json

Same data and steps: each of the two processes takes `--per_device_batch` examples per step (a global batch of
twice that); the one-process run takes the same per-device batch with gradient accumulation over 2 micro-batches,
so each optimizer step sees the same examples in the same order (Accelerate hands micro-batch 2k + r to process r).
The teacher fine-tuning keeps its global batch too (half the per-device batch on two processes). The throughput
ratio is the one-process training time over the two-process one (the Trainer's `train_runtime`, stage-end
evaluations included): 2.0 is perfect scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

CONFIGS = REPO / "recipes" / "accelerate_configs"
CAUSAL_LM_RECIPE = REPO / "recipes" / "distill_causal_lm.py"
PROCESSES = 2

# the GLUE part on GPUs: MRPC, MiniLM fine-tuned for 3 epochs, then 1,000 distillation steps at 32 per GPU
GLUE_GPU_FLAGS = [
    "--task_name", "mrpc", "--max_seq_length", "128", "--finetune_teacher_epochs", "3", "--max_steps", "1000",
    "--learning_rate", "5e-5", "--refinement_learning_rate", "5e-6", "--per_device_eval_batch_size", "256",
    "--calibration_batches", "20", "--logging_steps", "50", "--dataloader_num_workers", "1", "--seed", "42",
]  # fmt: skip
GLUE_SMOKE_FLAGS = [
    "--task_name", "sst2", "--glue_dir", "recipes/data/sst2_sample", "--max_seq_length", "64",
    "--finetune_teacher_epochs", "0", "--max_steps", "8", "--max_train_samples", "64", "--max_eval_samples", "32",
    "--learning_rate", "1e-3", "--refinement_learning_rate", "1e-4", "--calibration_batches", "2",
    "--logging_steps", "1", "--seed", "42",
]  # fmt: skip
COMMON_FLAGS = ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        default=None,
        help="Comma-separated: glue, causal_lm (default: glue, and causal_lm where it can run).",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU processes (gloo), a tiny teacher, 8 steps.")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "multi_gpu.json"))
    parser.add_argument("--work_dir", default=None, help="Where the runs write (default: a temporary folder).")
    parser.add_argument("--glue_dir", default="../shared/data/glue", help="GLUE TSV folder (GPU part).")
    parser.add_argument("--teacher", default=None, help="GLUE teacher (default: the recipe's, all-MiniLM-L6-v2).")
    parser.add_argument("--per_device_batch", type=int, default=None, help="Default: 32 (GPU), 4 (smoke).")
    parser.add_argument("--teacher_batch", type=int, default=32, help="Global batch of the teacher fine-tuning.")
    parser.add_argument(
        "--causal_lm_args", default=None, help="Flags of recipes/distill_causal_lm.py for its part (one string)."
    )
    return parser.parse_args(argv)


def launch_command(config: str, recipe: Path, flags: list[str]) -> list[str]:
    port = _free_port()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    return [*launcher, "--main_process_port", str(port), str(recipe), *flags]


def run_recipe(config: str, recipe: Path, flags: list[str], output_dir: Path) -> dict:
    """Runs `recipe` under `accelerate launch --config_file config` and summarizes its `results.json`."""
    command = launch_command(config, recipe, [*flags, "--output_dir", str(output_dir)])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-5000:])
        raise SystemExit(f"{shlex.join(command)} failed with exit code {completed.returncode}")
    summary = run_summary(json.loads((output_dir / "results.json").read_text()))
    return {**summary, "wall_time_s": round(wall, 1), "command": shlex.join(command).replace(sys.executable, "python")}


def run_summary(results: dict) -> dict:
    """The figures of one run that the comparison needs, from a recipe's `results.json`."""
    metric = results.get("main_metric")
    train = next((entry for entry in reversed(results.get("log_history", [])) if "train_runtime" in entry), {})
    peak = results.get("peak_memory_mb_per_process") or [results.get("peak_memory_mb")]
    digests = results.get("replica_weight_digests")
    return {
        "world_size": results.get("world_size"),
        "global_step": results.get("global_step"),
        "main_metric": metric,
        "student": (results.get("student") or {}).get("metrics", {}).get(metric),
        "teacher": (results.get("teacher") or {}).get("metrics", {}).get(metric),
        "train_runtime_s": train.get("train_runtime"),
        "train_samples_per_second": train.get("train_samples_per_second"),
        "peak_memory_mb_per_process": peak,
        "replica_weights_identical": None if digests is None else len(set(digests)) == 1,
    }


def compare(one: dict, two: dict) -> dict:
    """Two processes against one: throughput ratio (one's training time over two's) and metric differences."""

    def difference(name):
        return None if one[name] is None or two[name] is None else two[name] - one[name]

    ratio = None
    if one["train_runtime_s"] and two["train_runtime_s"]:
        ratio = round(one["train_runtime_s"] / two["train_runtime_s"], 3)
    return {
        "throughput_ratio": ratio,
        "student_difference": difference("student"),
        "teacher_difference": difference("teacher"),
    }


def part_flags(part: str, args: argparse.Namespace, teacher: str | None) -> tuple[Path, str, list[str], int]:
    """The recipe, the two-process accelerate config, the flags shared by both runs and the per-device batch."""
    batch = args.per_device_batch or (4 if args.smoke else 32)
    if part == "glue":
        flags = [*(GLUE_SMOKE_FLAGS if args.smoke else [*GLUE_GPU_FLAGS, "--glue_dir", args.glue_dir]), *COMMON_FLAGS]
        if teacher:
            flags += ["--model_name_or_path", teacher]
        config = "ddp_2proc_cpu.yaml" if args.smoke else "ddp_2proc.yaml"
        return REPO / "recipes" / "distill_glue.py", config, flags, batch
    if part == "causal_lm":
        if not CAUSAL_LM_RECIPE.is_file() or not args.causal_lm_args:
            raise ValueError("the causal_lm part needs recipes/distill_causal_lm.py and --causal_lm_args")
        if args.smoke:
            raise ValueError("the causal_lm part runs FSDP2, which Accelerate keeps only on GPUs: no --smoke")
        return CAUSAL_LM_RECIPE, "fsdp2_2proc.yaml", [*shlex.split(args.causal_lm_args), *COMMON_FLAGS], batch
    raise ValueError(f"Unknown part {part!r}: allowed are glue, causal_lm.")


def run_plan(part: str, args: argparse.Namespace, teacher: str | None) -> dict[str, tuple[str, Path, list[str]]]:
    """The accelerate config, recipe and flags of the one-process and the two-process run of `part`."""
    recipe, config, flags, batch = part_flags(part, args, teacher)

    def teacher_batch(processes: int) -> list[str]:  # the GLUE teacher's fine-tuning keeps its global batch
        return ["--teacher_batch_size", str(args.teacher_batch // processes)] if part == "glue" else []

    one = [*flags, *teacher_batch(1), "--per_device_train_batch_size", str(batch),
           "--gradient_accumulation_steps", str(PROCESSES)]  # fmt: skip
    two = [*flags, *teacher_batch(PROCESSES), "--per_device_train_batch_size", str(batch)]
    single = "single_cpu.yaml" if args.smoke else "single.yaml"
    return {"one_process": (single, recipe, one), "two_processes": (config, recipe, two)}


def run_part(part: str, args: argparse.Namespace, work_dir: Path, teacher: str | None) -> dict:
    plan = run_plan(part, args, teacher)
    runs = {
        name: run_recipe(config, recipe, flags, work_dir / f"{part}-{name}")
        for name, (config, recipe, flags) in plan.items()
    }
    _, recipe, _ = plan["two_processes"]
    return {"recipe": str(recipe.relative_to(REPO)), "config": plan["two_processes"][0],
            "per_device_batch": args.per_device_batch or (4 if args.smoke else 32), **runs,
            **compare(runs["one_process"], runs["two_processes"])}  # fmt: skip


def machine() -> dict:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "host": platform.node(),
        "cpu": platform.machine(),
        "cores": os.cpu_count(),
        "gpus": gpus,
        "gpu": torch.cuda.get_device_name(0) if gpus else None,
    }


def versions() -> dict:
    import accelerate
    import torch
    import transformers

    import had_hf

    return {"had_hf": had_hf.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    if args.parts is None:  # glue, and causal_lm where it can run
        runnable = CAUSAL_LM_RECIPE.is_file() and args.causal_lm_args and not args.smoke
        parts = ["glue", *(["causal_lm"] if runnable else [])]
    else:
        parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    for part in parts:  # an unknown part, or one that cannot run, fails before any run
        try:
            part_flags(part, args, None)
        except ValueError as error:
            raise SystemExit(f"multi_gpu.py: {error}") from None
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="multi_gpu-"))
    teacher = args.teacher
    if args.smoke and teacher is None:
        from recipes.common.tiny_teacher import save_tiny_glue_teacher

        teacher = str(save_tiny_glue_teacher(work_dir / "tiny-teacher"))
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.is_file() else {"parts": {}}
    for part in parts:
        report["parts"][part] = run_part(part, args, work_dir, teacher)
        print(json.dumps({part: report["parts"][part]}, indent=2))
    report.update(smoke=args.smoke, machine=machine(), versions=versions(), command=shlex.join(["python", *sys.argv]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
