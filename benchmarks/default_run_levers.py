"""Levers of the GLUE recipe on its embedded CPU default: `python recipes/distill_glue.py --seed S [lever flags]` (the
SST-2 sample, 240 steps, a tenth of the sample's training split held out), several seeds per lever, judged on the
held-out part only (dev is recorded, not compared).

The levers are `glue_plan.LEVERS` (the GPU experiments' names). A run whose output folder already holds its
`results.json` is read, not run again, so an interrupted sweep goes on where it stopped:

    python benchmarks/default_run_levers.py --levers defaults,ste_attention --seeds 42,43,44 \
        --runs_dir /tmp/glue_cpu --out benchmarks/results/default_run_levers_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_run import held_out_summary, run_recipe  # noqa: E402
from glue_levers import lever_flags  # noqa: E402
from glue_plan import LEVERS  # noqa: E402

SUMMED = ("teacher", "had")


def lever_runs(lever: str, seeds: list[int], runs_dir: Path) -> list[dict]:
    """The embedded default under `lever`, one run per seed (read from `runs_dir` where it already ran)."""
    runs = []
    for seed in seeds:
        output_dir = runs_dir / f"{lever}_{seed}"
        flags = ["--seed", str(seed), *lever_flags(lever, "sst2", LEVERS), "--output_dir", str(output_dir)]
        if (output_dir / "results.json").exists():
            results = json.loads((output_dir / "results.json").read_text())
            ran = [flag for flag in results["command"].split()[2:] if flag != "--overwrite_output_dir"]
            if ran != flags:
                raise SystemExit(
                    f"{output_dir} holds a run of other flags ({' '.join(ran)}), not lever {lever!r} at seed {seed} "
                    f"({' '.join(flags)}): move it away or choose another --runs_dir."
                )
        else:
            results, _, _ = run_recipe([*flags, "--overwrite_output_dir"])
        # the command as the recipe recorded it in results.json
        runs.append({"seed": seed, "command": results["command"], **held_out_summary(results)})
    return runs


def mean_of(runs: list[dict]) -> dict:
    """Means over the seeds: held-out teacher, student (the stage end kept) and each deployable stage end; dev."""
    return {
        "held_out": {key: statistics.mean(run["held_out"][key] for run in runs) for key in SUMMED},
        "stage_ends_deployable": {
            stage: statistics.mean(run["stage_ends_deployable"][stage] for run in runs)
            for stage in runs[0]["stage_ends_deployable"]
        },
        "dev": {key: statistics.mean(run[key] for run in runs) for key in SUMMED},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default="defaults,ste_attention", help=f"of: {', '.join(LEVERS)}")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--runs_dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    levers = args.levers.split(",")
    unknown = [lever for part in levers for lever in part.split("+") if lever not in LEVERS]
    if unknown:
        raise SystemExit(f"Unknown lever(s) {unknown}; the levers: {', '.join(LEVERS)}.")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    report = {
        "description": __doc__.split("\n\n")[0],
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
        "levers": {},
    }
    for lever in levers:
        runs = lever_runs(lever, seeds, args.runs_dir)
        report["levers"][lever] = {"mean": mean_of(runs), "runs": runs}
        print(lever, json.dumps(report["levers"][lever]["mean"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
