"""The record of a GLUE recipe run that ended before its `results.json`: read back from the run's log.

A run cut short (the device session ended first) leaves only its log: the trainer's logged dictionaries (training
losses every `--logging_steps`, the held-out evaluation every `--eval_steps`, `deployable_*` at each stage end), the
HAD callback's "step S starts stage K (name)" lines and each finished stage's "Stage <name> pace: {...}" line
(`recipes.common.stage_pace`: its steps, compiling and steady step time, time between steps), after the machine's
line at the start (processor, cores, GPU). This script turns the logs of one `glue_defaults.py` output folder into
runs in the layout of `glue_defaults.json` (`metrics_per_stage` with the deployable evaluation of each stage that
ended, `eval_curve`, the teacher's dev and held-out metrics) marked `complete: false`, with the step the run reached,
each finished stage's steps per second, and its `pace` and the `machine` where the log has them. A run whose log ends
with the recipe's closing line (`wall time ... s, peak memory ...`) is marked `complete: true`, its last stage ending
at the scheduled step (its steps per second, without a timestamp at the end, are left out; its pace line is read):
the way to read the stages' pace of a finished run.

    python benchmarks/glue_run_log.py --logs DEVICE_FILES/f --json benchmarks/results/glue_full_schedule.json \
        --note "why the runs ended early"
    # runs of several sessions in one file: one folder each
    python benchmarks/glue_run_log.py --logs results/logs/a results/logs/b --json ... --note "..."
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from glue_defaults import build_parser, recipe_command  # noqa: E402
from glue_plan import planned_runs, run_steps  # noqa: E402

STAGE_START = re.compile(r"^(\S+ \S+) INFO had_hf\.callbacks: HAD: step (\d+) starts stage (\d+) \((\w+)\)\.")
MACHINE = re.compile(r"^\S+ \S+ INFO \S+: Machine: (\{.*\})\.$")
STAGE_PACE = re.compile(r"^\S+ \S+ INFO \S*stage_pace: Stage (\w+) pace: (\{.*\})$")
RUN_END = re.compile(r"^wall time [\d.]+ s, peak memory ")
MAIN_METRIC = {"sst2": "accuracy", "mrpc": "f1", "stsb": "pearson", "rte": "accuracy"}


def _logged_dict(line: str) -> dict | None:
    """A line the trainer logged (`{'loss': '0.1', ...}`) as a dict of floats, or None for any other line."""
    if not line.startswith("{'"):
        return None
    try:
        row = ast.literal_eval(line.strip())
    except (SyntaxError, ValueError):
        return None
    return {key: float(value) for key, value in row.items()}


def _metrics(row: dict, prefix: str) -> dict:
    skip = ("_loss", "_runtime", "_samples_per_second", "_steps_per_second")
    return {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix) and not k.endswith(skip)}


def parse_log(text: str, logging_steps: int, steps_scheduled: int) -> dict:
    """The stage starts, the stage-end evaluations and the held-out curve of one run's log, and whether it finished.

    Steps are counted from the distillation's training-log lines, logged at the multiples of `logging_steps`
    (checked against each stage's own start step); the evaluations logged at a stage's end take that stage's last
    step, and those after the last training line of a finished run take `steps_scheduled`."""
    stages, curve, per_stage, teacher = [], [], [], {}
    step, distilling, last_eval, since_training_line, finished, machine = 0, False, None, [], False, None
    for line in text.splitlines():
        if distilling and RUN_END.match(line):
            step, finished = steps_scheduled, True
            for row in since_training_line:  # the last stage's end-of-stage evaluations
                row["step"] = step
            break
        host = MACHINE.match(line)
        if host:  # the recipe's first line (`recipes.common.run_record.begin_run`)
            machine = json.loads(host.group(1))
            continue
        start = STAGE_START.match(line)
        if start:
            when, begin, _, name = start.groups()
            if distilling and not step <= int(begin) < step + logging_steps:
                raise ValueError(f"stage {name} starts at step {begin}, the log's count is at {step}")
            step, distilling = int(begin), True
            for row in since_training_line:  # the previous stage's end-of-stage evaluations
                row["step"] = step
            stages.append({"stage": name, "start_step": step, "started": when})
            continue
        pace = STAGE_PACE.match(line)
        if pace:  # logged after the next stage's start (or at the run's end): `recipes.common.stage_pace`
            next(stage for stage in reversed(stages) if stage["stage"] == pace.group(1))["pace"] = json.loads(
                pace.group(2)
            )
            continue
        row = _logged_dict(line)
        if row is None:
            continue
        if not distilling:  # the teacher's fine-tuning: its dev (eval_) and held-out (validation_) metrics
            teacher.update({"dev": _metrics(row, "eval_")} if "eval_loss" in row else {})
            teacher.update({"held_out": _metrics(row, "validation_")} if "validation_loss" in row else {})
        elif "loss" in row and "stage" in row:
            step, since_training_line = (step // logging_steps + 1) * logging_steps, []
        elif any(k.startswith("eval_") for k in row):
            last_eval = {"step": step, **{f"eval_{k}": v for k, v in _metrics(row, "eval_").items()}}
            curve.append(last_eval)
            since_training_line.append(last_eval)
        elif any(k.startswith("deployable_") for k in row):
            metrics = {k[5:]: v for k, v in last_eval.items() if k != "step"} if last_eval else None
            per_stage.append({"stage": stages[-1]["stage"], "step": step, "metrics": metrics,
                              "deployable_metrics": _metrics(row, "deployable_")})  # fmt: skip
            since_training_line.append(per_stage[-1])
    for stage, following in zip(stages, stages[1:]):
        seconds = (_time(following["started"]) - _time(stage["started"])).total_seconds()
        stage["steps_per_second"] = round((following["start_step"] - stage["start_step"]) / seconds, 2)
    return {"stages": stages, "metrics_per_stage": per_stage, "eval_curve": curve, "teacher": teacher,
            "steps_reached": step, "finished": finished, **({"machine": machine} if machine else {})}  # fmt: skip


def _time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


def _flag(command: list[str], name: str, default: str) -> str:
    """The last value given to `name` (the recipe takes the last of repeated flags)."""
    values = [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == name]
    return values[-1] if values else default


def run_from_log(log: Path, command: list[str], variant: str) -> dict:
    """One run's entry from its log, its recipe command and its variant (`a+b` for a combination of levers)."""
    task, seed = _flag(command, "--task_name", ""), int(_flag(command, "--seed", "42"))
    steps_scheduled = run_steps(variant, task, int(_flag(command, "--max_steps", "5000")))
    parsed = parse_log(log.read_text(), int(_flag(command, "--logging_steps", "500")), steps_scheduled)
    complete = parsed.pop("finished")
    metric = MAIN_METRIC[task]
    curve = [{"stage": row["stage"], "step": row["step"],
              "deployable": 100 * row["deployable_metrics"][metric]} for row in parsed["metrics_per_stage"]]  # fmt: skip
    return {
        "task": task, "variant": variant, "seed": seed, "main_metric": metric, "complete": complete,
        "steps_scheduled": steps_scheduled,
        "command": " ".join(command), **parsed, "stage_end_curve": curve,
    }  # fmt: skip


def recipe_commands(folder: Path) -> list[tuple[dict, list[str]]]:
    """Every run started in `folder` (its planned entry) with its recipe command, rebuilt from the folder's
    `run_commands.txt` (the `glue_defaults.py run` lines) and its part files, as `glue_defaults.py` built them there."""
    commands = []
    for line in (folder / "run_commands.txt").read_text().splitlines():
        args = build_parser().parse_args(line.split()[2:])
        args.teacher = args.teacher or ".carry/minilm"
        index, count = args.part.split("/")
        names = json.loads((folder / f"part{index}of{count}.json").read_text())
        for run in planned_runs(args):
            if run["name"] in names:
                command = recipe_command(args, run)
                commands.append((run, ["python", str(Path(command[1]).relative_to(REPO)), *command[2:]]))
    return commands


def collect_logs(folder: Path, note: str) -> dict:
    """Every run of a `glue_defaults.py run` folder (`run_commands.txt`, the part files, `<run>.log`) from its log."""
    runs = {}
    for run, command in recipe_commands(folder):
        log = folder / f"{Path(_flag(command, '--output_dir', '')).name}.log"
        if not log.exists():
            raise SystemExit(f"{log}: no log for this run of {folder / 'run_commands.txt'}.")
        runs[log.stem] = run_from_log(log, command, run["variant"])
    return {"runs": runs, "run_command": (folder / "run_commands.txt").read_text().splitlines(), "note": note}


def collect_folders(folders: list[Path], note: str) -> dict:
    """`collect_logs` of several `glue_defaults.py run` folders (one per device session) as one file."""
    records = [collect_logs(folder, note) for folder in folders]
    runs = {name: run for record in records for name, run in record["runs"].items()}
    if len(runs) < sum(len(record["runs"]) for record in records):
        raise SystemExit(f"Two of {', '.join(map(str, folders))} hold a run of the same name.")
    return {"runs": runs, "run_command": [line for record in records for line in record["run_command"]], "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", required=True, nargs="+",
                        help="glue_defaults.py --out folders, or their logs as fetched")  # fmt: skip
    parser.add_argument("--json", required=True, help="the file to write")
    parser.add_argument("--note", default="", help="where the runs ran and why they ended early")
    parser.add_argument("--extra", default="{}", help="a JSON object of fields added to the file (machine, command)")
    args = parser.parse_args()
    record = {**collect_folders([Path(folder) for folder in args.logs], args.note), **json.loads(args.extra)}
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({name: [run["steps_reached"], run["stage_end_curve"]] for name, run in record["runs"].items()}))


if __name__ == "__main__":
    main()
