"""benchmarks/glue_run_log.py: a GLUE recipe run read back from its log when it ended before its results.json."""

import json
from argparse import Namespace
from pathlib import Path

import pytest

from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]
STAGES = ["tanh", "sign", "ste", "refinement"]
LOGS = REPO / "benchmarks" / "results" / "logs" / "glue_full_schedule"


@pytest.fixture(scope="module")
def reader():
    return load_script(REPO / "benchmarks" / "glue_run_log.py", "glue_run_log")


def _stage_line(second: int, step: int, number: int, name: str) -> str:
    return f"2026-01-01 10:00:{second:02d},000 INFO had_hf.callbacks: HAD: step {step} starts stage {number} ({name})."


def _pace_line(name: str, steps: int) -> str:
    return f'2026-01-01 10:00:59,000 INFO recipes.common.stage_pace: Stage {name} pace: {{"steps": {steps}, "slow_s": 2.5}}'


def test_a_log_gives_steps_stage_ends_and_the_teachers_metrics(reader):
    """Logging every 10 steps, stage 2 starting at step 25: the stage-end evaluations (logged before stage 2's line)
    take step 25, the training lines after it count from 30, and each finished stage has its steps per second and the
    pace its line gives (logged after the next stage's start)."""
    lines = ['2026-01-01 09:59:00,000 INFO recipes.common.run_record: Machine: {"cpu": "X", "cpu_count": 16}.',
             "{'loss': '0.7', 'epoch': '1'}",  # the teacher's fine-tuning
             "{'eval_loss': '0.5', 'eval_accuracy': '0.9', 'eval_runtime': '1'}",
             "{'validation_loss': '0.4', 'validation_accuracy': '0.95'}",
             _stage_line(0, 0, 1, "tanh")]  # fmt: skip
    lines += ["{'loss': '0.1', 'stage': 1, 'c': '4'}"] * 2  # steps 10, 20
    lines += ["{'eval_accuracy': '0.8', 'eval_runtime': '1'}", "{'deployable_accuracy': '0.75'}", "not a dict {'x'"]
    lines += [_stage_line(5, 25, 2, "sign"), _pace_line("tanh", 25), "{'loss': '0.1', 'stage': 2, 'c': '1'}"]  # 30
    lines += ["{'eval_accuracy': '0.85'}", _stage_line(10, 35, 3, "ste")]
    parsed = reader.parse_log("\n".join(lines), logging_steps=10, steps_scheduled=100)
    assert [stage.get("pace") for stage in parsed["stages"]] == [{"steps": 25, "slow_s": 2.5}, None, None]
    assert not parsed["finished"] and parsed["machine"] == {"cpu": "X", "cpu_count": 16}
    assert parsed["teacher"] == {"dev": {"accuracy": 0.9}, "held_out": {"accuracy": 0.95}}
    assert parsed["metrics_per_stage"] == [
        {"stage": "tanh", "step": 25, "metrics": {"accuracy": 0.8}, "deployable_metrics": {"accuracy": 0.75}}
    ]
    assert [row["step"] for row in parsed["eval_curve"]] == [25, 35] and parsed["steps_reached"] == 35
    assert [stage.get("steps_per_second") for stage in parsed["stages"]] == [5.0, 2.0, None]
    with pytest.raises(ValueError, match="starts at step 90"):  # a stage start the count does not reach
        reader.parse_log("\n".join(lines[:6] + [_stage_line(9, 90, 2, "sign")]), logging_steps=10, steps_scheduled=100)


def test_a_finished_log_ends_its_last_stage_at_the_scheduled_step(reader):
    """The recipe's closing line marks the run finished: the evaluations after the last training line (step 40 of
    45 scheduled) are the last stage's end at step 45; a line after it is not read."""
    lines = [_stage_line(0, 0, 1, "tanh"), "{'loss': '0.1', 'stage': 1, 'c': '4'}"]  # step 10
    lines += [_stage_line(4, 15, 2, "sign")] + ["{'loss': '0.1', 'stage': 2, 'c': '1'}"] * 3  # steps 20-40
    lines += ["{'eval_accuracy': '0.8'}", "{'deployable_accuracy': '0.7'}"]
    lines += [_pace_line("sign", 30), "wall time 12.5 s, peak memory 10.0 MB; outputs in /tmp/x"]
    lines += ["{'eval_accuracy': '0.1'}"]
    parsed = reader.parse_log("\n".join(lines), logging_steps=10, steps_scheduled=45)
    assert parsed["finished"] and parsed["steps_reached"] == 45
    assert [stage.get("pace") for stage in parsed["stages"]] == [None, {"steps": 30, "slow_s": 2.5}]
    assert parsed["metrics_per_stage"] == [
        {"stage": "sign", "step": 45, "metrics": {"accuracy": 0.8}, "deployable_metrics": {"accuracy": 0.7}}
    ]
    assert [row["step"] for row in parsed["eval_curve"]] == [45]
    assert [stage.get("steps_per_second") for stage in parsed["stages"]] == [3.75, None]
    unfinished = reader.parse_log("\n".join(lines[:-2]), logging_steps=10, steps_scheduled=45)
    assert not unfinished["finished"] and unfinished["steps_reached"] == 40


@pytest.mark.parametrize(
    "folder, results_file",
    [("glue_full_schedule", "glue_full_schedule.json"),
     ("glue_full_schedule_defaults_repeat", "glue_full_schedule_defaults_repeat_logs.json")],
)  # fmt: skip
def test_the_committed_full_schedule_file_is_what_its_logs_give(reader, folder, results_file):
    """Runs cut short in the refinement stage: the committed file is what their logs give, three stage ends each."""
    logs = LOGS.parent / folder
    if not logs.is_dir():
        pytest.skip(f"{logs} is absent")
    committed = json.loads((REPO / "benchmarks" / "results" / results_file).read_text())
    rebuilt = reader.collect_logs(logs, committed["note"])
    assert committed["runs"] == json.loads(json.dumps(rebuilt["runs"]))
    for run in committed["runs"].values():
        assert not run["complete"] and run["steps_reached"] < run["steps_scheduled"] == 29209
        assert [row["stage"] for row in run["stage_end_curve"]] == ["tanh", "sign", "ste"]


def test_the_compiled_pace_of_the_plan_is_the_measured_one(reader):
    """The plan's slowest pace of a compiled run (eager floor x compiled speedup) is within 15% of the sign-stage pace
    of the two compiled whole-schedule runs (their logs; the tanh stage's pace includes the compiling)."""
    logs = LOGS.parent / "glue_full_schedule_compiled"
    if not logs.is_dir():
        pytest.skip(f"{logs} is absent")
    glue_plan = load_script(REPO / "benchmarks" / "glue_plan.py", "glue_plan")
    committed = json.loads((REPO / "benchmarks" / "results" / "glue_full_schedule_compiled.json").read_text())
    assert committed["runs"] == json.loads(json.dumps(reader.collect_logs(logs, committed["note"])["runs"]))
    paces = [stage["steps_per_second"] for run in committed["runs"].values() for stage in run["stages"]
             if stage["stage"] == "sign"]  # fmt: skip
    assert len(paces) == 2
    planned = glue_plan.SLOWEST_STEPS_PER_S * glue_plan.COMPILED_STEP_SPEEDUP
    assert min(paces) * 0.85 <= planned <= min(paces)


def test_the_plan_of_a_run_in_cuda_graphs_covers_the_measured_ones():
    """The plan's time for one whole-schedule run in CUDA graphs is no shorter than the runs in graphs took (each alone
    on an H100) and at most 20% longer than the slower."""
    glue_plan = load_script(REPO / "benchmarks" / "glue_plan.py", "glue_plan")
    committed = json.loads((REPO / "benchmarks" / "results" / "glue_full_schedule_defaults.json").read_text())
    walls = [run["wall_time_s"] for run in committed["runs"].values() if run.get("run_as", "").endswith("+graphs")]
    assert len(walls) == 2
    (planned,) = glue_plan.planned_runs(
        Namespace(variants="full_schedule+compiled+graphs", tasks="mrpc", seeds="43", max_steps=5000, smoke=False)
    )
    assert max(walls) <= glue_plan.estimate_seconds([planned]) <= 1.2 * max(walls)


def test_the_present_defaults_whole_schedule_logs_agree_with_the_finished_run(reader):
    """The logs of the present defaults' whole-schedule runs (two sessions' folders) give the committed file, and the
    STS-B run's stage ends read from its log are those of its own results.json (glue_full_schedule_defaults.json)."""
    folders = [LOGS.parent / "glue_full_schedule_defaults", LOGS.parent / "glue_full_schedule_defaults_mrpc"]
    if not all(folder.is_dir() for folder in folders):
        pytest.skip(f"{folders} are absent")
    results = REPO / "benchmarks" / "results"
    committed = json.loads((results / "glue_full_schedule_defaults_logs.json").read_text())
    rebuilt = reader.collect_folders(folders, committed["note"])
    assert committed["runs"] == json.loads(json.dumps(rebuilt["runs"]))
    assert committed["run_command"] == rebuilt["run_command"] and len(committed["run_command"]) == 2
    with pytest.raises(SystemExit, match="same name"):
        reader.collect_folders([folders[0], folders[0]], "")
    mrpc = committed["runs"]["mrpc_full_schedule-compiled_seed42"]
    assert not mrpc["complete"] and 19209 < mrpc["steps_reached"] < mrpc["steps_scheduled"] == 29209
    assert [row["stage"] for row in mrpc["stage_end_curve"]] == STAGES[:3]
    from_log = committed["runs"]["stsb_full_schedule-compiled_seed42"]["stage_end_curve"]
    from_results = _finished_run("stsb_full_schedule-compiled_seed42")["stage_end_curve"]
    assert [row["stage"] for row in from_log] == [row["stage"] for row in from_results] == STAGES
    for logged, collected in zip(from_log, from_results):
        assert logged["deployable"] == pytest.approx(collected["deployable"], abs=0.01)  # the log rounds to 4 digits


def _finished_run(name: str) -> dict:
    """The finished run that ran as `name` in glue_full_schedule_defaults.json, whose runs are named by their recipe
    (the execution levers `compiled`, `regional`, `graphs` relabeled away, each run's own variant kept as `run_as`)."""
    task, variant, seed = load_script(REPO / "benchmarks" / "glue_plan.py", "glue_plan").parse_run_name(name)
    runs = json.loads((REPO / "benchmarks" / "results" / "glue_full_schedule_defaults.json").read_text())["runs"]
    (run,) = [run for run in runs.values() if (run["task"], run["seed"], run.get("run_as", run["variant"]))
              == (task, seed, variant)]  # fmt: skip
    return run


@pytest.mark.parametrize(
    ("folders", "logs_file", "names"),
    [
        (["glue_full_schedule_defaults_mrpc_regional"], "glue_full_schedule_defaults_mrpc_regional_logs.json",
         ["mrpc_full_schedule-compiled-regional_seed42"]),
        (["glue_full_schedule_defaults_mrpc_seed43_graphs", "glue_full_schedule_defaults_rte_seed42_graphs"],
         "glue_full_schedule_defaults_graphs_logs.json",
         ["mrpc_full_schedule-compiled-graphs_seed43", "rte_full_schedule-compiled-graphs_seed42"]),
    ],
)  # fmt: skip
def test_a_finished_runs_log_gives_its_results_stage_ends(reader, folders, logs_file, names):
    """Runs that finished (MRPC compiled layer by layer; MRPC and RTE in CUDA graphs): their logs read as complete,
    their four stage ends are those of their results.json (glue_full_schedule_defaults.json), and the committed logs
    file (their stages' pace) is what the logs give."""
    folders = [LOGS.parent / folder for folder in folders]
    if not all(folder.is_dir() for folder in folders):
        pytest.skip(f"{folders} are absent")
    committed = json.loads((REPO / "benchmarks" / "results" / logs_file).read_text())
    assert committed["runs"] == json.loads(json.dumps(reader.collect_folders(folders, committed["note"])["runs"]))
    assert sorted(committed["runs"]) == sorted(names)
    for name in names:
        run, finished = committed["runs"][name], _finished_run(name)
        assert run["complete"] and run["steps_reached"] == run["steps_scheduled"] == 29209
        assert [row["step"] for row in run["stage_end_curve"]] == [row["step"] for row in finished["stage_end_curve"]]
        for logged, collected in zip(run["stage_end_curve"], finished["stage_end_curve"], strict=True):
            assert logged["deployable"] == pytest.approx(collected["deployable"], abs=0.01)  # the log rounds
