"""The stages' pace against a hand count of a scripted clock."""

import json
import logging
from types import SimpleNamespace

import pytest

from had_hf.schedule import StageSchedule
from recipes.common import stage_pace
from recipes.common.stage_pace import StagePaceCallback


def test_each_stage_counts_its_steps_slow_steps_and_the_time_between_steps(monkeypatch, caplog):
    schedule = StageSchedule.build(max_steps=8)
    ends = [entry["end_step"] for entry in schedule.timeline()]
    # every step takes 0.25 s but the first of each stage (2 s: compiling), and 0.5 s pass between two steps
    durations = {step: 2.0 if step in [0, *ends[:-1]] else 0.25 for step in range(8)}
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(stage_pace.time, "perf_counter", lambda: clock.now)
    callback = StagePaceCallback(schedule)
    state = SimpleNamespace(global_step=0)
    with caplog.at_level(logging.INFO, logger=stage_pace.__name__):
        for step in range(8):
            state.global_step = step
            callback.on_step_begin(None, state, None)
            clock.now += durations[step]
            state.global_step = step + 1
            callback.on_step_end(None, state, None)
            clock.now += 0.5
        callback.on_train_end(None, state, None)

    summary = callback.summary()
    assert list(summary) == ["tanh", "sign", "ste", "refinement"]
    for entry in schedule.timeline():
        steps = range(entry["start_step"], entry["end_step"])
        expected_step_s = sum(durations[s] for s in steps)
        # the time after a stage's last step belongs to it, but the run's last: nothing follows it
        between = 0.5 * (len(steps) if entry["end_step"] < 8 else len(steps) - 1)
        row = summary[entry["stage"]]
        assert row["steps"] == len(steps)
        assert row["step_s"] == pytest.approx(expected_step_s)
        assert row["slow_steps"] == 1 and row["slow_s"] == pytest.approx(2.0)
        assert row["between_steps_s"] == pytest.approx(between)
        assert row["wall_s"] == pytest.approx(expected_step_s + between)
        assert row["steady_step_s"] == (pytest.approx(0.25) if len(steps) > 1 else None)
    logged = [r.getMessage() for r in caplog.records if " pace: " in r.getMessage()]
    assert [line.split()[1] for line in logged] == ["tanh", "sign", "ste", "refinement"]
    assert json.loads(logged[0].split(" pace: ", 1)[1]) == summary["tanh"]
