"""The LoRA learning-rate scale of the GLUE recipe on the CPU: its embedded default through LoRA at each scale.

`--use_peft` multiplies every stage's learning rate by `--lora_learning_rate_scale` (10 by default), a scale measured
on SmolLM2 (`causal_lm_learning_rate.py`). These runs check it on the GLUE recipe's embedded default (all-MiniLM-L6-v2
on an SST-2 sample, 240 steps, seed 42), identical but for the scale; `full` is the same run without LoRA. The figures
that matter are on the held-out tenth of the training sample (the recipe's `validation` split); dev is recorded too.

    python benchmarks/glue_lora_learning_rate.py --arms lora_1,lora_10,full \
        --out benchmarks/results/glue_lora_learning_rate_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from default_run import held_out_summary, run_recipe  # noqa: E402

# name: the recipe's flags beside the embedded default
ARMS = {
    "full": [],
    "lora_1": ["--use_peft", "--lora_learning_rate_scale", "1"],
    "lora_10": ["--use_peft", "--lora_learning_rate_scale", "10"],
    "lora_30": ["--use_peft", "--lora_learning_rate_scale", "30"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="lora_1,lora_10", help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--work_dir", default="/tmp/glue_lora_learning_rate", help="the runs' output folders")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise SystemExit(f"Unknown arm(s) {unknown}; the arms: {', '.join(ARMS)}.")
    report = {"arms": {}}
    if args.out and Path(args.out).exists():
        report = json.loads(Path(args.out).read_text())  # arms run before are kept, those run now replaced
    for arm in arms:
        flags = [*ARMS[arm], "--output_dir", str(Path(args.work_dir, arm)), "--overwrite_output_dir"]
        results, wall, _ = run_recipe(flags)
        report["arms"][arm] = {
            "command": " ".join(["python", "recipes/distill_glue.py", *flags]),
            "learning_rates": {
                key: results["training_args"].get(key)
                for key in ("learning_rate", "ste_learning_rate", "refinement_learning_rate")
            },
            "wall_time_s": round(wall, 1),
            **held_out_summary(results),
        }
        print(arm, json.dumps(report["arms"][arm]["held_out"]), report["arms"][arm]["stage_ends_deployable"])
    report["machine"] = {"cpu": platform.machine(), "cores": os.cpu_count(), "host": platform.node()}
    report["measured_by"] = " ".join(["python", *sys.argv])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
