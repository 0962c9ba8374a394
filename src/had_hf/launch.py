"""CPU threads of a training process started by `accelerate launch` on a machine without an accelerator.

`accelerate launch` sets `OMP_NUM_THREADS` in every process it starts to its `--num_cpu_threads_per_process`, which
defaults to the caller's `OMP_NUM_THREADS` or 1. It computes a larger value (physical cores / processes) only when
its config says `use_cpu: true` (`recipes/accelerate_configs/single_cpu.yaml`, `ddp_2proc_cpu.yaml`) and
`OMP_NUM_THREADS` is unset. Launched any other way on a CPU (no config file, or a GPU config), a process trains on
one thread. `use_cpu_cores` gives such a process the cores available to it, divided among the local processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)


def cpu_threads_per_process(environ: Mapping[str, str], cpu_count: int, has_accelerator: bool) -> int | None:
    """The torch thread count for a process that `accelerate launch` left at its default of one thread on a machine
    without an accelerator: `cpu_count` divided among the local processes; None to keep the current count."""
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in environ
    if has_accelerator or not launched_by_accelerate or environ.get("OMP_NUM_THREADS") != "1":
        return None
    if environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        return None  # a CPU config: accelerate chose the thread count itself
    threads = cpu_count // max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    return threads if threads > 1 else None


def use_cpu_cores() -> int | None:
    """Applies `cpu_threads_per_process` to this process (`torch.set_num_threads`); returns the new count or None."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    threads = cpu_threads_per_process(os.environ, cores, has_accelerator)
    if threads is not None:
        torch.set_num_threads(threads)
        logger.info(
            "accelerate launch left one CPU thread per process (OMP_NUM_THREADS=1) on a machine without a GPU: "
            "using %d threads (the CPU config recipes/accelerate_configs/single_cpu.yaml sets them itself).",
            threads,
        )
    return threads
