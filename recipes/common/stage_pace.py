"""Where a distillation run's time goes, stage by stage: the `stage_pace` entry of `results.json`, and one log line
at each stage's end (`Stage <name> pace: {...}`) so that a run cut short still tells it.

The clock is read at each optimizer step's begin and end, without synchronizing the device (that would change the
pace it measures). So a step's time is the host's: compiling and tracing show whole; on a device the kernels run
behind the host, which waits for them only where something reads a result, so single steps are not the device's
time but a stage's totals are.

Per stage:

| field | what |
|---|---|
| `steps` | optimizer steps of the stage that ran |
| `wall_s` | from the stage's first step's begin to its last step's end, plus what followed it before the next stage |
| `step_s` | the steps' own time (step begin to step end): forward, backward, optimizer |
| `slow_steps`, `slow_s` | steps that took more than `SLOW_STEP_S` (compiling, re-tracing), and their time |
| `steady_step_s` | the mean of the other steps: the stage's pace once compiled |
| `between_steps_s` | the time between a step's end and the next one's begin: the next batch, logging, evaluation |
"""

from __future__ import annotations

import json
import logging
import time

from transformers import TrainerCallback

from had_hf.schedule import PHASE_NAMES, StageSchedule

logger = logging.getLogger(__name__)

SLOW_STEP_S = 1.0
"""A step longer than this (seconds) counts as compiling, not as the stage's pace."""


class StagePaceCallback(TrainerCallback):
    """Times a `HADDistillationTrainer`'s steps by stage (phase) of its `schedule` (see the module docstring)."""

    def __init__(self, schedule: StageSchedule):
        self.schedule = schedule
        self.stages: dict[str, dict] = {}
        self._stage: str | None = None
        self._begin: float | None = None
        self._end: float | None = None

    def _record(self, stage: str) -> dict:
        return self.stages.setdefault(
            stage, {"steps": 0, "step_s": 0.0, "slow_steps": 0, "slow_s": 0.0, "between_steps_s": 0.0}
        )

    def on_step_begin(self, args, state, control, **kwargs):
        now = time.perf_counter()
        stage = PHASE_NAMES[self.schedule.phase(state.global_step)]
        if self._stage is not None and self._end is not None:
            self._record(self._stage)["between_steps_s"] += now - self._end
        if stage != self._stage:
            self._finish_stage()
            self._stage = stage
        self._begin = now

    def on_step_end(self, args, state, control, **kwargs):
        if self._begin is None:
            return
        now = time.perf_counter()
        seconds = now - self._begin
        record = self._record(self._stage)
        record["steps"] += 1
        record["step_s"] += seconds
        if seconds > SLOW_STEP_S:
            record["slow_steps"] += 1
            record["slow_s"] += seconds
        self._end = now

    def on_train_end(self, args, state, control, **kwargs):
        self._finish_stage()
        self._stage = None

    def _finish_stage(self) -> None:
        if self._stage is not None and self._stage in self.stages:
            logger.info("Stage %s pace: %s", self._stage, json.dumps(_summary_row(self.stages[self._stage])))

    def summary(self) -> dict[str, dict]:
        """{stage: its row (see the module docstring)} for the stages that ran, in schedule order."""
        return {stage: _summary_row(record) for stage, record in self.stages.items()}


def _summary_row(record: dict) -> dict:
    """A stage's counts, rounded, with the two figures derived from them: `wall_s` and `steady_step_s`."""
    row = {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}
    row["wall_s"] = round(record["step_s"] + record["between_steps_s"], 3)
    steady = record["steps"] - record["slow_steps"]
    row["steady_step_s"] = round((record["step_s"] - record["slow_s"]) / steady, 5) if steady else None
    return row
