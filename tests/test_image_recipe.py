"""recipes/distill_image_classification.py: its embedded default as a smoke test, its data and metrics, and the
arguments it refuses before loading anything."""

import sys

import numpy as np
import pytest

from tests.conftest import load_script
from tests.recipe_runs import REPO, check_run_output, run_recipe

SCRIPT = "recipes/distill_image_classification.py"


def _recipe():
    return load_script(REPO / SCRIPT, "distill_image_classification_recipe")


@pytest.mark.slow
def test_embedded_default_smoke(tmp_path):
    out = tmp_path / "run"
    flags = ["--max_steps", "8", "--max_train_samples", "64", "--max_eval_samples", "20",
             "--finetune_teacher_epochs", "1", "--calibration_batches", "2", "--logging_steps", "1",
             "--disable_tqdm", "true", "--output_dir", str(out)]  # fmt: skip
    result = run_recipe([sys.executable, SCRIPT, *flags])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "No images ship offline" in result.stdout and "No ViT weights ship offline" in result.stdout
    assert "top5_accuracy" in result.stdout and "Shortened schedule" in result.stderr + result.stdout
    results = check_run_output(out, steps=8, processor_file="preprocessor_config.json")
    assert results["tokens_per_image"] == 197 and results["had_config"]["top_n"] == 30
    assert results["dataset"]["num_labels"] == 10 and results["dataset"]["eval_examples"] == 20
    assert 0 <= results["student"]["metrics"]["top5_accuracy"] <= 1


def test_synthetic_folder_loads_as_an_imagefolder_with_processor_transforms(tmp_path):
    from recipes.common import image_data

    recipe = _recipe()
    folder = image_data.write_synthetic_image_folder(tmp_path / "images", image_size=56, train_per_class=3,
                                                     eval_per_class=2)  # fmt: skip
    train, evaluation, split = image_data.load_image_splits(
        None, train_dir=str(folder / "train"), validation_dir=str(folder / "validation"), cache_dir=str(tmp_path / "c")
    )
    assert (len(train), len(evaluation), split) == (30, 20, "validation")
    names = image_data.class_names(train, "label")
    assert names == [f"hue{k}" for k in range(10)]
    model, processor = recipe.tiny_vit(len(names), dict(enumerate(names)))
    rows = image_data.with_processor_transform(train, processor, "image", "label")
    batch = rows[:4]
    assert tuple(batch["pixel_values"].shape) == (4, 3, 56, 56) and batch["labels"] == train[:4]["label"]
    assert model(pixel_values=batch["pixel_values"]).logits.shape == (4, 10)
    # without a validation or test split, part of the training split is held out (seeded)
    train_only, held_out, split = image_data.load_image_splits(
        None, train_dir=str(folder / "train"), train_val_split=0.2, seed=1, cache_dir=str(tmp_path / "c")
    )
    assert (len(train_only), len(held_out), split) == (24, 6, "0.2 of train")


def test_top_k_accuracies_against_a_count_by_hand():
    from recipes.common.image_data import top_k_accuracies

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 8))
    labels = rng.integers(0, 8, size=50)
    top1 = sum(int(np.argmax(row) == label) for row, label in zip(logits, labels)) / 50
    # top-5: the label's logit is beaten by fewer than five others
    top5 = sum(int(sum(other > row[label] for other in row) < 5) for row, label in zip(logits, labels)) / 50
    assert top_k_accuracies(logits, labels) == pytest.approx({"accuracy": top1, "top5_accuracy": top5})
    assert 0 < top1 < top5 < 1
    assert set(top_k_accuracies(logits[:, :5], labels % 5)) == {"accuracy"}  # five classes: top-5 is always 1


@pytest.fixture
def recipe_without_loading(monkeypatch):
    recipe = _recipe()

    def refuse(*args, **kwargs):
        raise AssertionError("a model or the data was loaded before the arguments were refused")

    monkeypatch.setattr(recipe, "load_image_splits", refuse)
    monkeypatch.setattr(recipe.AutoModelForImageClassification, "from_pretrained", refuse)
    return recipe


BAD_ARGUMENTS = {
    "train_dir": (
        ["--train_dir", "/no/such/images", "--finetune_teacher_epochs", "1"],
        "--train_dir /no/such/images: no such folder",
    ),
    "untrained tiny teacher": (["--finetune_teacher_epochs", "0"], "pass --finetune_teacher_epochs N"),
    "remove_unused_columns": (["--remove_unused_columns", "true"], "--remove_unused_columns must be false"),
    "both sources": (["--dataset_name", "cifar10", "--train_dir", "x"], "not both"),
    "split": (["--train_val_split", "1.5"], "train_val_split must be in (0, 1)"),
    "top_n": (["--top_n", "0"], "top_n must be a positive integer"),
}


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_are_refused_before_loading(recipe_without_loading, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe_without_loading.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_flags_alone_apply_to_the_embedded_default_and_the_data_flags_do_not(tmp_path, capsys):
    recipe = _recipe()
    script_args, training_args, _ = recipe.parse_arguments(["--max_steps", "12", "--output_dir", str(tmp_path / "a")])
    assert training_args.user_max_steps == 12 and script_args.finetune_teacher_epochs == 8
    assert training_args.remove_unused_columns is False
    script_args, training_args, _ = recipe.parse_arguments(
        ["--train_dir", str(tmp_path), "--finetune_teacher_epochs", "1", "--output_dir", str(tmp_path / "b")]
    )
    assert "--train_dir given: starting from the library defaults" in capsys.readouterr().out
    assert training_args.user_max_steps is None and script_args.top_n is None  # the paper's schedule, N = 30
    assert training_args.remove_unused_columns is False


def test_use_peft_wraps_the_vit_query_and_key_projections_of_this_transformers_version():
    """`--use_peft` on a ViT: the adapter wraps each attention layer's query and key projections, whichever name this
    transformers version gives them (`query`/`key` or `q_proj`/`k_proj`), and nothing else."""
    pytest.importorskip("peft")
    import had_hf
    from had_hf import HADConfig
    from had_hf.peft_student import make_peft_student

    model, _ = _recipe().tiny_vit(3, {0: "a", 1: "b", 2: "c"})
    student = make_peft_student(had_hf.convert(model, HADConfig(top_n=30)), lora_r=2)
    wrapped = sorted({name.rsplit(".", 2)[-2] for name, _ in student.named_modules() if name.endswith(".lora_A")})
    assert wrapped in (["key", "query"], ["k_proj", "q_proj"])
    layers = {name.split(".attention")[0] for name, _ in student.named_modules() if name.endswith(".lora_A")}
    assert len(layers) == model.config.num_hidden_layers
