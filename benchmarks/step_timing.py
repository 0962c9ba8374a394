"""What the training-step benchmarks share (`distill_step.py`, `causal_lm_step.py`): the per-step timer callback, the
CUDA-graph trees' events per step, the peak memory, the machine and versions of a record, the paper-weighted mean over
stages, and a profiler's top ops."""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections import Counter

import torch
import transformers
from transformers import TrainerCallback

from had_hf.schedule import StageSchedule


class StepTimer(TrainerCallback):
    """The wall time of every optimizer step (the device synchronized at each step's end), and the peak memory after
    the first `warmup` steps."""

    def __init__(self, device: str, warmup: int):
        self.cuda = device.startswith("cuda")
        self.warmup = warmup
        self.seconds: list[float] = []
        self._last = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.seconds.append(now - self._last)
        self._last = now
        if self.cuda and state.global_step == self.warmup:
            torch.cuda.reset_peak_memory_stats()


class CUDAGraphEvents(TrainerCallback):
    """What inductor's CUDA-graph trees (`torch_compile_mode="reduce-overhead"`) did, counted from their log at each
    optimizer step's end: graphs `recorded` and `rerecorded`, `warmup` runs, `eager` runs (a compiled function run
    outside its graph, in the graphs' memory pool, because the trees could not replay it: the slow path) and graphs
    `skipped` (left out of CUDA graphs; `skip_reasons` keeps each reason's start)."""

    EVENTS = {
        "Recording function": "recorded",
        "Re-recording function": "rerecorded",
        "Running warmup function": "warmup",
        "Running eager function": "eager",
        "skipping cudagraphs": "skipped",
    }
    LOGGERS = ("torch._inductor.cudagraph_trees", "torch._inductor.cudagraph_utils")

    def __init__(self):
        self.counts: Counter = Counter()
        self.skip_reasons: Counter = Counter()
        self.after_step: list[dict] = []
        events = self

        class Handler(logging.Handler):
            def emit(self, record):
                events.count(record.getMessage())

        import torch._inductor.cudagraph_trees  # noqa: F401  (their loggers exist before the logs are set)
        import torch._inductor.cudagraph_utils  # noqa: F401

        torch._logging.set_logs(cudagraphs=True)
        self.handlers = [(logging.getLogger(f"{name}.__cudagraphs"), Handler(logging.DEBUG)) for name in self.LOGGERS]
        for logger, handler in self.handlers:
            logger.addHandler(handler)

    def close(self) -> None:
        """Stops counting and sets torch's logs back to their defaults."""
        for logger, handler in self.handlers:
            logger.removeHandler(handler)
        torch._logging.set_logs()

    def count(self, message: str) -> None:
        for text, event in self.EVENTS.items():
            if text in message:
                self.counts[event] += 1
                if event == "skipped":
                    self.skip_reasons[message[:160]] += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append(dict(self.counts))

    def between(self, start_step: int, end_step: int) -> dict:
        """The events of steps `start_step` to `end_step` - 1 (0-based)."""
        before = self.after_step[start_step - 1] if start_step > 0 else {}
        after = self.after_step[end_step - 1] if end_step > 0 else {}
        return {event: after.get(event, 0) - before.get(event, 0) for event in self.EVENTS.values()}


def peak_memory(device: str) -> float:
    """Peak MB: CUDA allocator peak on the GPU; on the CPU the process's peak RSS (run each measurement in its own
    process, so that the figures do not mix)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_record(device: str) -> dict:
    """The device, its name, the CPU threads, the versions and the command line, for a results file."""
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(["python", *sys.argv]),
    }


def paper_weighted_step_s(stage_step_s: dict[str, float]) -> float:
    """The mean step time of a run with the paper's schedule: each stage's step time weighted by its share of the
    paper's steps."""
    paper = {e["stage"]: e["end_step"] - e["start_step"] for e in StageSchedule.build().timeline()}
    return sum(stage_step_s[stage] * steps for stage, steps in paper.items()) / sum(paper.values())


def top_profiled_ops(prof, device: str, steps: int, rows: int = 25) -> dict:
    """The ops (and on CUDA the kernels) of a `torch.profiler` run that took the most time, per step.

    On CUDA the ops are ranked by the device time of the kernels they launched themselves (`self_device_time`), the
    kernels by their own; the host time of all ops is given too (a step whose host time exceeds its device time waits
    on Python and launches, not on the GPU). On the CPU the ops are ranked by their own CPU time (indicative of the
    GPU's only: there every elementwise pass is much cheaper relative to matmuls and sorts)."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    cuda = device.startswith("cuda")

    def device_us(event) -> float:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    def entry(event, us: float) -> dict:
        return {"name": event.key, "ms_per_step": round(us / 1000 / steps, 3), "calls_per_step": event.count / steps}

    ops = [event for event in events if event.device_type == DeviceType.CPU]
    host_ms = sum(event.self_cpu_time_total for event in ops) / 1000 / steps
    record = {"steps": steps, "host_ms_per_step": round(host_ms, 3), "ops_per_step": sum(e.count for e in ops) / steps}
    if cuda:
        kernels = [event for event in events if event.device_type == DeviceType.CUDA]
        record["device_ms_per_step"] = round(sum(device_us(event) for event in kernels) / 1000 / steps, 3)
        record["kernels_per_step"] = sum(event.count for event in kernels) / steps
        record["top_kernels"] = [entry(e, device_us(e)) for e in sorted(kernels, key=device_us, reverse=True)[:rows]]
        ranked = sorted(ops, key=device_us, reverse=True)[:rows]
        record["top_ops"] = [entry(e, device_us(e)) for e in ranked]
    else:
        ranked = sorted(ops, key=lambda event: event.self_cpu_time_total, reverse=True)[:rows]
        record["top_ops"] = [entry(e, e.self_cpu_time_total) for e in ranked]
    return record
