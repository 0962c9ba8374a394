"""What a recipe run leaves in its output folder: the student (`save_model`), `results.json` (the record that
`had_hf.hub` renders the model card from) and the teacher-against-student table it prints.

`results.json` holds the recipe's own part (task, main metric, teacher and student metrics, dataset) and the part
every recipe writes alike (`run_record`): the evaluation split, held-out validation figures and stage end kept,
HADConfig, schedule, stage timeline and metrics per stage (in the stage's forward and deployable), log history, seed,
the machine, steps, wall time and each stage's pace (`recipes.common.stage_pace`), peak memory, world size, command,
arguments and versions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import set_seed

import had_hf
from had_hf.hub import model_metrics
from had_hf.launch import use_cpu_cores
from had_hf.replicas import per_process, replica_weight_digests
from had_hf.trainer import DEPLOYABLE_PREFIX

from .run_paths import clear_earlier_run


def begin_run(script_args, training_args, logger: logging.Logger) -> float:
    """Logging, CPU threads, the earlier run's files removed (--overwrite_output_dir), the seed, a warning where
    --max_steps shortens the schedule; returns the start time."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.logging.set_verbosity_warning()
    use_cpu_cores()  # accelerate launch without a CPU config leaves one thread per process
    clear_earlier_run(script_args, training_args, logger)
    set_seed(training_args.seed)
    schedule = training_args.schedule()
    if schedule.scale != 1.0:
        logger.warning("Shortened schedule: %s.", schedule.describe())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    logger.info("Machine: %s.", json.dumps(machine()))
    return time.time()


def machine(cpuinfo: str | None = None) -> dict:
    """The host's processor and cores and the GPU: a launch-bound run's pace depends on the processor as much as on
    the GPU (the `machine` entry of `results.json`, and logged at the run's start).

    A virtual machine's processor name can be as bare as "Intel(R) Xeon(R) Processor", so its vendor, family, model
    and stepping (`cpu_id`) and its clock as reported (`cpu_mhz`) are recorded too, from `/proc/cpuinfo` (or the text
    given as `cpuinfo`); off Linux only the name `platform` gives."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():  # the first processor's block is enough
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    record = {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if "cpu family" in fields:
        named = (("family", "cpu family"), ("model", "model"), ("stepping", "stepping"))
        parts = [fields.get("vendor_id", "?")] + [f"{name} {fields[key]}" for name, key in named if key in fields]
        record["cpu_id"] = " ".join(parts)
    if "cpu MHz" in fields:
        record["cpu_mhz"] = round(float(fields["cpu MHz"]))
    record["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return record


def strip_metrics(metrics: dict, prefix: str = "eval") -> dict:
    """The metrics named `{prefix}_*`, without the prefix, and without timings, the epoch and the loss."""
    return model_metrics(metrics, f"{prefix}_")


def metrics_per_stage(trainer, schedule) -> list[dict]:
    """One row per stage end, named by the stage that ended: the evaluation during training in the stage's own
    forward (`metrics`) and the deployable one, of the model as it would be saved (`deployable_metrics`, logged under
    `had_hf.trainer.DEPLOYABLE_PREFIX`). Evaluations after training (under their splits' own prefixes) and a repeated
    evaluation of a step are not stage ends: the first of each kind at a step counts."""
    ends = schedule.stage_ends()
    rows: dict[int, dict] = {}
    for entry in trainer.state.log_history:
        step = entry.get("step")
        if step not in ends:
            continue
        row = rows.setdefault(step, {"stage": ends[step], "step": step, "metrics": {}, "deployable_metrics": {}})
        for key, prefix in (("metrics", "eval"), ("deployable_metrics", DEPLOYABLE_PREFIX)):
            if not row[key] and any(k.startswith(f"{prefix}_") for k in entry):
                row[key] = strip_metrics(entry, prefix)
    return [row for _, row in sorted(rows.items()) if row["metrics"] or row["deployable_metrics"]]


def peak_memory_mb() -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU, in MiB."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: kilobytes


def run_record(run, script_args, training_args, *, command: str, start_time: float) -> dict:
    """The part of `results.json` every recipe writes alike (see the module docstring), from a finished
    `recipes.common.distillation.DistillationRun`."""
    trainer = run.trainer
    schedule = trainer.schedule
    return {
        # the split of every evaluation during the run and of any choice among stage ends; the held-out part of the
        # training split where the recipe holds one out (`validation`), and the stage end kept (`model_selection`)
        "evaluation_split": run.evaluation_split,
        "validation": run.validation,
        "model_selection": run.model_selection,
        "metrics_per_stage": metrics_per_stage(trainer, schedule),
        "had_config": run.had_config.to_dict(),
        "schedule": schedule.to_dict(),
        "schedule_description": schedule.describe(),
        "stage_timeline": schedule.timeline(),
        "log_history": trainer.state.log_history,
        "seed": training_args.seed,
        "global_step": run.train_output.global_step,
        "machine": machine(),
        "wall_time_s": round(time.time() - start_time, 1),
        "stage_pace": run.stage_pace,
        "peak_memory_mb": peak_memory_mb(),
        "peak_memory_mb_per_process": per_process(trainer.accelerator, peak_memory_mb()),
        "world_size": training_args.world_size,
        "replica_weight_digests": replica_weight_digests(trainer),
        "command": command,
        "script_args": asdict(script_args),
        "peft_args": asdict(script_args.peft),
        "training_args": json.loads(training_args.to_json_string()),
        "had_hf_version": had_hf.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def save_run(trainer, results: dict, title: str) -> None:
    """The student (and its tokenizer or processor), saved by every process (FSDP gathers the shards); then, on the
    main process, `results.json`, the model card (README.md, training curves) and the printed table."""
    trainer.save_model()
    if trainer.is_world_process_zero():
        Path(trainer.args.output_dir, "results.json").write_text(json.dumps(results, indent=2, default=str))
    trainer.create_model_card()  # every process: the teacher's evaluation, where it runs, is collective
    if trainer.is_world_process_zero():
        print_comparison(results, title)
    end_run(trainer)


def end_run(trainer) -> None:
    """The last step of a recipe: every process waits for the others, leaves the process group
    (`Accelerator.end_training`) and, in a run of several processes, exits at once (`os._exit(0)`, its output and logs
    flushed), since the run has written everything. The interpreter's teardown would free the DDP reducer, whose gloo
    process group joins its worker threads while holding the GIL; a worker still freeing a finished collective needs
    the GIL, and the process hangs there (or, with the group still alive, aborts: "terminate called without an active
    exception"). In a single process only the waiting and leaving happen, both no-ops, and the caller goes on."""
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if trainer.accelerator.num_processes > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def print_comparison(results: dict, title: str) -> None:
    """Teacher against HAD student per metric (in percent); the main metric after each stage, in the stage's own
    forward and deployable; the held-out split's figures and the stage end kept, where there are; time and memory."""
    teacher, student = results["teacher"]["metrics"], results["student"]["metrics"]
    names = [k for k in teacher if k in student and isinstance(teacher[k], (int, float))]
    print()
    print(f"{title} -- {results['schedule_description']}")
    print(f"{'metric':<24}{'teacher':>10}{'HAD':>10}{'drop':>10}")
    for name in names:
        t, s = 100 * teacher[name], 100 * student[name]
        print(f"{name:<24}{t:>10.2f}{s:>10.2f}{t - s:>10.2f}")
    stages, main = results["metrics_per_stage"], results["main_metric"]
    for key, what in (("metrics", "in the stage's own forward"), ("deployable_metrics", "deployable (as saved)")):
        if any(row[key] for row in stages):
            curve = ", ".join(
                f"{row['stage']}@{row['step']}: {100 * row[key].get(main, math.nan):.2f}" for row in stages
            )
            print(f"{main} on {results['evaluation_split']} after each stage, {what}: {curve}")
    validation = results["validation"]
    if validation:
        print(
            f"{main} on the held-out validation split ({validation['examples']} examples): teacher "
            f"{100 * validation['teacher_metrics'][main]:.2f}, HAD {100 * validation['student_metrics'][main]:.2f}"
        )
    if results["model_selection"] and results["model_selection"]["restored"]:
        print(f"kept the best deployable stage end: step {results['model_selection']['best_step']}")
    print(
        f"wall time {results['wall_time_s']} s, peak memory {results['peak_memory_mb']} MB; "
        f"outputs in {results['training_args']['output_dir']}"
    )
