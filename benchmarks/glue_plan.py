"""The runs of `glue_defaults.py` and their plan: the levers of the defaults, every (task, variant, seed) run asked
for with its steps, and their split into parts that each fit one device call.

A part's wall time is estimated from the earlier rounds' timings (`estimate_seconds`: all of a part's runs start
together on the GPU(s)); `slowest_seconds` gives the same runs at the slowest pace measured for one process, against
a session's device time. Runs under the `compiled` lever count their steps at the measured compiled pace. `plan`
(`python benchmarks/glue_defaults.py plan`) prints the parts; `run` starts one.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glue_gpu import TEACHER_EPOCHS  # noqa: E402
from glue_levers import lever_flags  # noqa: E402

# the levers of the defaults (issue 23), each against the recipe's defaults; "+" combines them
LEVERS = {
    "defaults": [],
    "clip2": ["--ste_clip", "2.0"],  # the STE passes gradient on |x / sigma| <= 2 (the default: 1)
    "ste_lr_low": ["--ste_learning_rate", "2e-6"],  # stage 3 at the refinement stage's rate, not stages 1-2's
    "lr_x2.5": ["--learning_rate", "5e-5", "--refinement_learning_rate", "5e-6"],  # the earlier GLUE rounds' rates
    "attn_w10": ["--attention_loss_weight", "10"],
    "attn_w0.1": ["--attention_loss_weight", "0.1"],
    "refine_attn": ["--refinement_attention_loss_weight", "1.0"],  # the attention loss kept in stage 4
    "ste_attention": ["--ste_attention_loss_weight", "1"],  # the attention loss kept in the STE stage (the paper)
    "recalibrate": ["--recalibrate_sigma", "true"],  # sigma measured again on the student where the STE stage starts
    "last_stage_end": ["--keep_best_deployable", "false"],  # the last stage end kept, not the best held-out one
    "decay0.9998": ["--c_decay", "0.9998"],  # slower binarization: longer tanh and sign stages
    "no_aug": ["--distill_augment", "none"],  # no augmented copies of the distillation inputs
    # the recipe's defaults before this benchmark's first choice; with ste_attention+dropout, the paper's recipe
    "previous_defaults": ["--distill_augment", "none", "--keep_best_deployable", "false"],
    "dropout": ["--student_dropout", "0.1"],  # the student trains with MiniLM's (the teacher's) dropout
    "steps12000": ["--max_steps", "12000"],
    "full_schedule": ["--max_steps", "-1"],  # the paper's 29,209 steps
    "compiled": ["--torch_compile", "true"],  # the same recipe, its steps under torch.compile (not a recipe change)
    # with `compiled` (the recipe refuses it alone): each layer compiled on its own, one graph per stage shared by the
    # layers, so less time compiling (not a recipe change)
    "regional": ["--use_regional_compilation", "true"],
    # with `compiled`: the compiled steps run in CUDA graphs (inductor's "reduce-overhead" mode)
    "graphs": ["--torch_compile_mode", "reduce-overhead"],
}

# the earlier rounds on one H200 (benchmarks/results/glue*.json: wall_time_s of MiniLM runs at 5,000 steps, all
# running at once): 2 runs took ~300 s, 3 ~250-270 s, 4 ~330-360 s, 11-12 ~600-690 s, 16 ~1,240 s (the machine's 16 cores shared by
# more processes than that: each run past the 12th costs CROWDED_RUN_S more); 3 runs of 12,000 steps ~610 s
BASE_S, PER_RUN_S, SST2_TEACHER_S, STARTUP_S = 130.0, 45.0, 60.0, 40.0
UNCROWDED_RUNS, CROWDED_RUN_S = 12, 90.0
CALL_BUDGET_S = 480.0  # of a device call's 9 minutes (the rest: the machine's start, transfers, margin)
# a process's own pace sets a floor the crowding model above misses for a few long runs: the slowest measured
# (results/glue_full_schedule.json, 2 runs of the defaults at once) was 13.8 steps/s; a session lends 30 device minutes
SLOWEST_STEPS_PER_S, SESSION_S = 13.8, 1800.0
# a session's device time also pays for starting the machine: 2026-12-05's first call held it 758 s for 311 s of work
MACHINE_START_S = 450.0
# a distillation step under the `compiled` lever takes 1 / COMPILED_STEP_SPEEDUP of an eager one, after COMPILE_S of
# compiling the four stages' graphs (results/distill_step_cuda_compile.json: one process alone, 2.15x; two whole-
# schedule runs side by side, results/glue_full_schedule_compiled.json: 26.4-26.5 steps/s in the sign stage and ~24 in
# the STE stage against the eager runs' 13.8-14.9, so 1.7x where several runs share the machine)
COMPILED_STEP_SPEEDUP, COMPILE_S = 1.7, 165.0
# under `compiled+graphs` (CUDA graphs), a step takes 1 / GRAPHS_STEP_SPEEDUP of an eager one: the slower of the two
# whole-schedule runs in graphs, each alone on an H100 (results/glue_full_schedule_defaults.json: MRPC 528.5 s, RTE
# 462.3 s, with the same compiling and start as a compiled run)
GRAPHS_STEP_SPEEDUP = 3.1


def run_steps(variant: str, task: str, max_steps: int) -> int:
    """The optimizer steps of a run: the lever's --max_steps if it sets one (-1: the paper's 29,209)."""
    flags = lever_flags(variant, task, LEVERS)
    if "--max_steps" in flags:
        steps = int(flags[flags.index("--max_steps") + 1])
        return 29_209 if steps < 0 else steps
    return max_steps


def paced_steps(variant: str, steps: int) -> float:
    """A run's steps in eager steps' time: fewer under the `compiled` lever, fewer still in CUDA graphs."""
    levers = variant.split("+")
    if "compiled" not in levers:
        return float(steps)
    return steps / (GRAPHS_STEP_SPEEDUP if "graphs" in levers else COMPILED_STEP_SPEEDUP)


def estimate_seconds(runs: list[dict], gpus: int = 1) -> float:
    """The wall time of `runs` started together on `gpus` H200s (each GPU takes its share), from the earlier rounds'
    timings: per GPU, (BASE_S + PER_RUN_S * runs) scaled by the longest run's steps / 5,000, plus SST-2's teacher
    fine-tuning (a whole epoch of 60,000 examples) and the processes' start."""
    if not runs:
        return 0.0
    per_gpu = -(-len(runs) // max(gpus, 1))
    longest = max(run.get("paced_steps", run["steps"]) for run in runs)
    teacher = SST2_TEACHER_S if any(run["task"] == "sst2" for run in runs) else 0.0
    crowded = CROWDED_RUN_S * max(0, per_gpu - UNCROWDED_RUNS)
    return STARTUP_S + teacher + _compiling(runs) + (BASE_S + PER_RUN_S * per_gpu + crowded) * longest / 5000


def slowest_seconds(runs: list[dict]) -> float:
    """The wall time of `runs` started together if each went at the slowest pace measured for one process."""
    teacher = SST2_TEACHER_S if any(run["task"] == "sst2" for run in runs) else 0.0
    longest = max((run.get("paced_steps", run["steps"]) for run in runs), default=0)
    return STARTUP_S + teacher + _compiling(runs) + longest / SLOWEST_STEPS_PER_S


def _compiling(runs: list[dict]) -> float:
    return COMPILE_S if any("compiled" in run.get("variant", "").split("+") for run in runs) else 0.0


def planned_runs(args) -> list[dict]:
    """Every (task, variant, seed) run asked for, with its name and steps."""
    runs = []
    for variant in args.variants.split(","):
        for task in args.tasks.split(","):
            if task not in TEACHER_EPOCHS:
                raise SystemExit(f"Unknown task {task!r}; the benchmark's tasks: {', '.join(TEACHER_EPOCHS)}.")
            lever_flags(variant, task, LEVERS)  # an unknown lever fails here, before anything starts
            for seed in map(int, args.seeds.split(",")):
                steps = 8 if args.smoke else run_steps(variant, task, args.max_steps)
                runs.append({"name": run_name(task, variant, seed), "task": task, "variant": variant,
                             "seed": seed, "steps": steps, "paced_steps": paced_steps(variant, steps)})  # fmt: skip
    return runs


def run_name(task: str, variant: str, seed: int) -> str:
    """A run's name, also the stem of its files: letters, digits, '.', '_' and '-' only (the GPU machine returns no
    other file names), so a combination of levers `a+b` is named `a-b`."""
    return f"{task}_{variant.replace('+', '-')}_seed{seed}"


def parse_run_name(name: str) -> tuple[str, str, int]:
    """The task, variant and seed of a run named by `run_name` (lever names have no '-', so `a-b` is `a+b`)."""
    task, rest = name.split("_", 1)
    variant, _, seed = rest.rpartition("_seed")
    return task, variant.replace("-", "+"), int(seed)


def split_parts(runs: list[dict], parts: int) -> list[list[dict]]:
    """`runs` in `parts` groups of balanced estimated time (longest first, each to the group that ends first); the
    same runs give the same groups."""
    groups: list[list[dict]] = [[] for _ in range(parts)]
    for run in sorted(runs, key=lambda r: (-r["steps"], r["task"] != "sst2", r["name"])):
        min(groups, key=lambda group: (estimate_seconds(group + [run]), len(group))).append(run)
    return groups


def parts_needed(runs: list[dict], gpus: int = 1, budget: float = CALL_BUDGET_S) -> int:
    """The fewest parts whose estimates all fit `budget` (runs too long for any call each get a part of their own)."""
    for parts in range(1, len(runs) + 1):
        groups = split_parts(runs, parts)
        if all(estimate_seconds(group, gpus) <= budget or len(group) == 1 for group in groups):
            return parts
    return max(len(runs), 1)


def plan(args) -> list[list[dict]]:
    runs = planned_runs(args)
    parts = args.parts or parts_needed(runs, args.gpus)
    groups = split_parts(runs, parts)
    for index, group in enumerate(groups, 1):
        seconds = estimate_seconds(group, args.gpus)
        note = "" if seconds <= CALL_BUDGET_S else "  (longer than one call: run it with --detach, then wait)"
        print(f"part {index}/{parts}: ~{seconds / 60:.1f} min on {args.gpus} GPU(s){note}")
        slowest = slowest_seconds(group)
        if slowest > seconds:
            fits = "fits" if slowest <= SESSION_S - MACHINE_START_S else "does not fit"
            print(
                f"    at the slowest pace measured, {slowest / 60:.1f} min: {fits} a session's device time after "
                f"the machine's start (~{MACHINE_START_S / 60:.1f} min)"
            )
        for run in group:
            print(f"    {run['name']} ({run['steps']} steps)")
    return groups
