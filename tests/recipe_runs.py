"""Running a recipe as a user does (a subprocess from the repository root), and the checks of the output folder that
every distillation recipe shares with the GLUE recipe's."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["tanh", "sign", "ste", "refinement"]


def run_recipe(command: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)


def check_run_output(out: Path, steps: int, processor_file: str) -> dict:
    """The layout of a finished run: the student with its HADConfig (no training stage), its tokenizer or image
    processor, `results.json` with the four stages, their evaluations and the attention loss, the machine and each
    stage's pace, the fine-tuned teacher in `teacher/`, and a folder that `had-hf push` accepts and renders a card
    for. Returns the results."""
    from had_hf.hub import check_output_dir, render_model_card

    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == steps
    assert [entry["stage"] for entry in results["stage_timeline"]] == STAGES
    assert [row["stage"] for row in results["metrics_per_stage"]] == STAGES
    main = results["main_metric"]
    for side in ("teacher", "student"):
        assert 0 <= results[side]["metrics"][main] <= 1
    config = json.loads((out / "config.json").read_text())
    assert "stage" not in config["quantization_config"] and config["quantization_config"]["sigma_q"]
    assert config["attn_implementation"] == "hamming_topk"
    assert (out / "model.safetensors").is_file() and (out / processor_file).is_file()
    assert (out / "teacher" / "model.safetensors").is_file()
    assert results["machine"]["cpu_count"] == os.cpu_count() and results["machine"]["cpu"]
    pace = results["stage_pace"]
    assert list(pace) == STAGES
    for entry in results["stage_timeline"]:
        row = pace[entry["stage"]]
        assert row["steps"] == entry["end_step"] - entry["start_step"]
        assert row["wall_s"] >= row["step_s"] >= row["slow_s"] >= 0 and row["between_steps_s"] >= 0
    train_logs = [entry for entry in results["log_history"] if "loss_attn" in entry]
    assert [entry["stage"] for entry in train_logs] == sorted(entry["stage"] for entry in train_logs)
    assert train_logs[-1]["loss_attn"] == 0 and train_logs[0]["loss_attn"] > 0
    check_output_dir(out)
    card = render_model_card(out, "org/had-student")
    assert f"{results['teacher']['metrics'][main]:.4f}" in card.content and "hamming_topk" in card.content
    return results
