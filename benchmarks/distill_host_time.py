"""Host time of a distillation step, by phase: where the time goes when the device is not what bounds a step.

On a GPU, MiniLM's compiled distillation steps (32 x 128 tokens) take 15-31 ms while its arithmetic takes well under
one (benchmarks/README.md, "Host time per distillation step"): the steps are bound by the host, which runs the
Trainer's loop, the library's per-step code and the compiled graphs' launches. This benchmark runs
`HADDistillationTrainer` on a model with MiniLM's structure (6 layers, 12 heads) and tiny widths, so
that the arithmetic is negligible on any device, and times each phase of every step on the host by wrapping the
methods that run it: the teacher's forward, the binding of the capture stores to the attention modules, the loss
(`compute_loss`: both forwards, the binding and the losses), the backward, the optimizer step, transformers' per-step
FLOP count, and the whole step. Medians over each stage's steps after its first `--warmup` (where a compiled run
compiles). On a GPU the phases are not synchronized with the device: each is the host's time, including any wait for
the device inside it.

    python benchmarks/distill_host_time.py                       # compiled, CPU
    python benchmarks/distill_host_time.py --device cuda --eager

Writes benchmarks/results/distill_host_time_<device>[_eager].json with the machine, versions and command.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, TrainerCallback

import had_hf
from had_hf import HADConfig, HADDistillationTrainer, HADTrainingArguments
from had_hf.capture import HADCaptureStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_step import RandomTokens, pad_to_multiple_of_8  # noqa: E402
from step_timing import machine_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("step", "compute_loss", "teacher_forward", "bind_stores", "backward", "optimizer_step", "flop_count")


class PhaseTimes(TrainerCallback):
    """Each phase's host seconds per optimizer step (`record` adds to the running step's), and the whole step's."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)
        self._start = 0.0

    def record(self, phase: str, seconds: float) -> None:
        self._current[phase] += seconds

    def on_step_begin(self, args, state, control, **kwargs):
        self._current = defaultdict(float)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._current["step"] = time.perf_counter() - self._start
        self.steps.append(dict(self._current))


def time_method(owner, name: str, phase: str, times: PhaseTimes) -> None:
    """Wraps `owner.name` so that each call's host time adds to `phase`."""
    method = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            times.record(phase, time.perf_counter() - start)

    setattr(owner, name, timed)


def time_binding(times: PhaseTimes):
    """`HADCaptureStore.bound` with its entering and leaving timed as `bind_stores` (the context's body is not)."""
    bound = HADCaptureStore.bound

    @contextlib.contextmanager
    def timed_bound(store, model):
        start = time.perf_counter()
        context = bound(store, model)
        context.__enter__()
        times.record("bind_stores", time.perf_counter() - start)
        try:
            yield store
        finally:
            start = time.perf_counter()
            context.__exit__(None, None, None)
            times.record("bind_stores", time.perf_counter() - start)

    return timed_bound


def run(args) -> dict:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=48, intermediate_size=96, num_attention_heads=12, num_hidden_layers=6,
                        vocab_size=1200, num_labels=2)  # fmt: skip
    student = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager").to(args.device)
    times = PhaseTimes()
    trainer = HADDistillationTrainer(
        model=student,
        teacher_model=copy.deepcopy(student),
        args=HADTrainingArguments(
            output_dir=tempfile.mkdtemp(),
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            calibration_batches=2,
            logging_steps=50,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=args.device == "cpu",
            torch_compile=not args.eager,
            seed=0,
        ),
        had_config=HADConfig(top_n=4),
        train_dataset=RandomTokens(args.steps * args.batch, args.seq, config.vocab_size),
        data_collator=pad_to_multiple_of_8,
    )
    trainer.add_callback(times)
    time_method(trainer, "compute_loss", "compute_loss", times)
    time_method(trainer, "teacher_forward", "teacher_forward", times)
    time_method(trainer, "floating_point_ops", "flop_count", times)
    time_method(trainer.accelerator, "backward", "backward", times)
    original_bound = HADCaptureStore.bound
    HADCaptureStore.bound = time_binding(times)
    try:
        trainer.create_optimizer()
        time_method(trainer.optimizer, "step", "optimizer_step", times)
        trainer.train()
    finally:
        HADCaptureStore.bound = original_bound
    stages = {}
    for entry in trainer.schedule.timeline():
        steps = times.steps[entry["start_step"] : entry["end_step"]][args.warmup :]
        stages[entry["stage"]] = {
            "steps": len(steps),
            **{f"{phase}_ms": round(1e3 * statistics.median(s.get(phase, 0.0) for s in steps), 3) for phase in PHASES},
        }
    return {"stages": stages}


def source_commit() -> str | None:
    """The git commit of the had_hf source that ran (a checkout of another commit can run this script through
    PYTHONPATH), with "+changes" where its tree differs from that commit."""
    folder = Path(had_hf.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        changed = subprocess.run(["git", "status", "--porcelain", "."], cwd=folder, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed.stdout.strip() else "")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eager", action="store_true", help="the student and teacher uncompiled")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300, help="steps of the distillation (all four stages)")
    parser.add_argument("--warmup", type=int, default=5, help="steps of each stage left out of its medians")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = {
        "benchmark": "distill_host_time",
        "command": "python " + " ".join(sys.argv),
        "machine": machine_record(args.device),
        "model": "BERT with MiniLM's 6 layers and 12 heads, hidden 48 (random weights)",
        "batch": args.batch,
        "seq": args.seq,
        "compiled": not args.eager,
        "had_hf_commit": source_commit(),
        **run(args),
    }
    out = Path(
        args.out or RESULTS / f"distill_host_time_{args.device.split(':')[0]}{'_eager' if args.eager else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for stage, values in result["stages"].items():
        print(stage, " ".join(f"{phase} {values[f'{phase}_ms']:.2f}" for phase in PHASES))
    return result


if __name__ == "__main__":
    main()
