"""The HAD model card: valid Hub metadata, numbers that match `results.json`, the sections the issue asks for."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml
from fake_hub import make_results, save_output_dir, validate_card_metadata
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from had_hf import hub, plotting
from tests.conftest import markdown_table

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_ID = "had-org/tiny-had"


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    return save_output_dir(tmp_path_factory.mktemp("card") / "sst2-had")


@pytest.fixture(scope="module")
def results(output_dir) -> dict:
    return json.loads((output_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def card(output_dir) -> ModelCard:
    return hub.render_model_card(output_dir, REPO_ID)


def metadata_of(card: ModelCard) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", str(card), re.DOTALL)
    assert match, "the card must start with a YAML metadata block"
    return yaml.safe_load(match.group(1))


def section(card: ModelCard, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card.text, re.DOTALL | re.MULTILINE)
    assert match, f"no '## {title}' section"
    return match.group(1)


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    """The body rows of the first markdown table whose header row starts with `header_start`."""
    return markdown_table(markdown, f"| {header_start}")[1]


def test_template_ships_in_the_package_as_a_link_to_hub_cards():
    canonical = REPO_ROOT / "hub_cards" / hub.TEMPLATE_FILENAME
    packaged = REPO_ROOT / "src" / "had_hf" / "data" / hub.TEMPLATE_FILENAME
    assert packaged.is_symlink() and packaged.resolve() == canonical.resolve(), (
        f"{packaged} must be a symbolic link to {canonical} (one source for the template)"
    )
    assert hub.card_template() == canonical.read_text(encoding="utf-8")
    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = packaged.relative_to(REPO_ROOT / "src" / "had_hf").as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in package_data["had_hf"]), (
        f"pyproject's package-data must include {relative} so that the template ships in the wheel"
    )


def test_metadata_is_valid_and_round_trips(card, results):
    metadata = metadata_of(card)
    assert metadata["library_name"] == "had_hf"
    assert metadata["base_model"] == results["teacher"]["model_name_or_path"]
    assert metadata["datasets"] == ["nyu-mll/glue"]
    assert {"had", "binary-attention"} <= set(metadata["tags"])
    assert metadata["pipeline_tag"] == "text-classification"
    assert isinstance(metadata["license"], str)

    model_name, eval_results = model_index_to_eval_results(metadata["model-index"])
    assert model_name == REPO_ID.split("/")[1]
    assert {r.metric_type: r.metric_value for r in eval_results} == results["student"]["metrics"]
    assert {(r.task_type, r.dataset_type, r.dataset_config, r.dataset_split) for r in eval_results} == {
        ("text-classification", "nyu-mll/glue", "sst2", "validation")
    }
    # ModelCardData parses the model-index into EvalResults and writes it back unchanged.
    assert ModelCardData(**metadata).to_dict() == metadata
    assert ModelCard(str(card)).data.to_dict() == metadata
    assert validate_card_metadata(str(card)) == ([], [])


def test_results_table_matches_results_json(card, results):
    rows = table_rows(section(card, "Results"), "Metric")
    teacher, student = results["teacher"]["metrics"], results["student"]["metrics"]
    assert [row[0] for row in rows] == [results["main_metric"]] + sorted(set(student) - {results["main_metric"]})
    for metric, teacher_cell, student_cell, delta_cell in rows:
        assert float(teacher_cell) == pytest.approx(teacher[metric], abs=5e-5)
        assert float(student_cell) == pytest.approx(student[metric], abs=5e-5)
        assert float(delta_cell) == pytest.approx(student[metric] - teacher[metric], abs=1e-4)

    per_stage = table_rows(section(card, "Results"), "Stage")
    assert [(row[0], int(row[1]), float(row[2])) for row in per_stage] == [
        (entry["stage"], entry["step"], pytest.approx(entry["metrics"]["accuracy"], abs=5e-5))
        for entry in results["metrics_per_stage"]
    ]


def test_had_configuration_section(card, output_dir, results):
    text = section(card, "HAD configuration")
    settings = dict((row[0], row[1]) for row in table_rows(text, "Setting"))
    quantization_config = json.loads((output_dir / "config.json").read_text())["quantization_config"]
    assert settings["Keys kept per query (N)"] == str(quantization_config["top_n"])
    assert settings["Training steps"] == str(results["stage_timeline"][-1]["end_step"])

    sigmas = {row[0].strip("`"): (float(row[1]), float(row[2])) for row in table_rows(text, "Attention layer")}
    assert sigmas == {
        layer: (pytest.approx(sigma_q, abs=5e-5), pytest.approx(quantization_config["sigma_k"][layer], abs=5e-5))
        for layer, sigma_q in quantization_config["sigma_q"].items()
    }
    schedule = [(row[0], int(row[1]), int(row[2]), int(row[3])) for row in table_rows(text, "Stage | Start")]
    assert schedule == [
        (s["stage"], s["start_step"], s["end_step"], s["end_step"] - s["start_step"])
        for s in results["stage_timeline"]
    ]


def test_schedule_table_gives_each_stage_its_range_of_c(card, results):
    # c decays c_start -> c_switch in the tanh stage and c_switch -> c_end in the sign stage; the later stages use
    # sign(x), where c plays no part
    c_column = {row[0]: row[4] for row in table_rows(section(card, "HAD configuration"), "Stage | Start")}
    assert c_column == {"tanh": "5 → 1", "sign": "1 → 0.05", "ste": "– (sign)", "binary": "– (sign)"}


def test_how_to_use_says_how_to_install_and_to_import_had_hf_first(card):
    usage = " ".join(section(card, "How to use").split())  # markdown line breaks within a paragraph do not count
    assert "pip install had-hf" not in usage  # had-hf is on no package index
    assert "Install `had_hf` from its source checkout" in usage and "`pip install -e .` in the repository" in usage
    assert "`import had_hf` before loading" in usage and "do not mention had_hf" in usage


def test_teacher_row_names_the_base_model_and_the_fine_tuning_of_the_run(card, results):
    teacher = dict((row[0], row[1]) for row in markdown_table(section(card, "Training"), "| | |")[1])["Teacher"]
    base = results["teacher"]["model_name_or_path"]
    accuracy = results["teacher"]["metrics"]["accuracy"]
    assert teacher == (
        f"[`{base}`](https://huggingface.co/{base}) (base model), fine-tuned on `sst2` in this run (120 steps); "
        f"accuracy {accuracy:.4f}"
    )
    assert f"student of [`{base}`](https://huggingface.co/{base}) fine-tuned on `sst2` in this run" in card.text


@pytest.mark.parametrize(
    "recorded, argument, expected",
    [({}, None, "other"), ({"teacher": "apache-2.0"}, None, "apache-2.0"), ({"teacher": "apache-2.0"}, "mit", "mit"),
     ({"teacher": "apache-2.0", "run": "cc-by-4.0"}, None, "cc-by-4.0")],
    ids=["unknown", "teacher's", "argument", "recipe's --license"],
)  # fmt: skip
def test_license_is_the_teachers_unless_set(output_dir, tmp_path, recorded, argument, expected):
    folder = tmp_path / "run"
    folder.mkdir()
    for path in output_dir.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    results = json.loads((folder / "results.json").read_text())
    results["teacher"]["license"] = recorded.get("teacher")
    results["license"] = recorded.get("run")
    (folder / "results.json").write_text(json.dumps(results))
    card = hub.render_model_card(folder, REPO_ID, license=argument)
    assert metadata_of(card)["license"] == expected
    if expected == recorded.get("teacher") and argument is None and "run" not in recorded:
        assert "the license of the teacher" in card.text


def test_usage_training_and_citation_sections(card, results):
    assert "![Training curves: loss terms and eval accuracy" in section(card, "Training curves")
    assert "(training_curves.png)" in section(card, "Training curves")
    usage = section(card, "How to use")
    snippet = re.search(r"```python\n(.*?)```", usage, re.DOTALL).group(1)
    assert snippet.splitlines()[0].startswith("import had_hf")
    assert f'AutoModelForSequenceClassification.from_pretrained("{REPO_ID}")' in snippet
    assert "trust_remote_code=True" not in snippet
    assert f"```bash\n{results['command']}\n```" in section(card, "Training")
    citation = section(card, "Citation")
    assert (
        "title = {Hamming Attention Distillation: Binarizing Keys and Queries for Efficient Long-Context Transformers}"
        in citation
    )
    assert "arxiv" not in citation.lower(), "no invented arXiv number"


def test_card_of_a_sparse_record(tmp_path):
    """Uncalibrated sigmas, no log, a local teacher path, an image model: the card still renders and validates."""
    output_dir = tmp_path / "vit-had"
    output_dir.mkdir()
    had_config = {"quant_method": "had", "top_n": None, "top_n_ratio": 0.117, "stage": "binary"}
    config = {"architectures": ["ViTForImageClassification"], "model_type": "vit", "quantization_config": had_config}
    (output_dir / "config.json").write_text(json.dumps(config))
    (output_dir / "preprocessor_config.json").write_text("{}")
    results = make_results(had_config)
    for key in ("log_history", "stage_timeline", "metrics_per_stage", "command"):
        del results[key]
    results["teacher"]["model_name_or_path"] = str(tmp_path)  # a local folder is not a Hub id
    results["dataset"] = {"name": "imagenet-1k", "source": str(tmp_path)}
    results["license"] = "apache-2.0"
    (output_dir / "results.json").write_text(json.dumps(results))

    card = hub.render_model_card(output_dir)

    metadata = metadata_of(card)
    assert "base_model" not in metadata
    assert metadata["datasets"] == ["imagenet-1k"]
    assert metadata["license"] == "apache-2.0"
    assert metadata["pipeline_tag"] == "image-classification"
    assert validate_card_metadata(str(card)) == ([], [])
    assert "ceil(0.117 × number of keys)" in section(card, "HAD configuration")
    assert "not calibrated" in section(card, "HAD configuration")
    assert "training_curves.png" not in str(card)
    assert f'AutoModelForImageClassification.from_pretrained("{output_dir}")' in str(card)
    assert "AutoImageProcessor" in str(card)
    assert "\n\n\n" not in card.text


def test_training_curves_plot(results, tmp_path):
    log = results["log_history"] + [{"step": 180, "train_loss": 9.0}]
    assert set(plotting.loss_curves(log)) == {"loss", "loss_attn", "loss_out"}, "train_loss is a summary, not a curve"
    steps, values = plotting.metric_curve(log, "accuracy")
    assert steps == [e["step"] for e in log if "eval_accuracy" in e] and len(values) == len(steps)

    path = plotting.plot_training_curves(
        log, tmp_path / "curves.png", metric="accuracy", stage_timeline=results["stage_timeline"], teacher_metric=0.9
    )
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="Nothing to plot"):
        plotting.plot_training_curves([{"step": 1, "learning_rate": 1e-5}], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def test_card_names_extra_distillation_inputs(output_dir, results, card, tmp_path):
    # the shared record has none: the card says nothing about them
    assert "Extra distillation inputs" not in card.text and "unlabeled" not in card.text
    extra_dir = tmp_path / "stsb-had"
    extra_dir.mkdir()
    for path in output_dir.iterdir():
        if path.is_file():
            (extra_dir / path.name).write_bytes(path.read_bytes())
    extra = json.loads(json.dumps(results))
    extra["dataset"].update({"distill_extra_tasks": "mrpc,rte", "train_examples": 5749, "distill_examples": 11907})
    (extra_dir / "results.json").write_text(json.dumps(extra))
    text = hub.render_model_card(extra_dir, REPO_ID).text
    expected = (
        "the training texts of `mrpc`, `rte` (6,158 examples), unlabeled (the teacher's outputs are the targets)"
    )
    assert f"| Extra distillation inputs | {expected} |" in text
    assert f" and {expected} with `had_hf`." in text
    assert "\n\n\n" not in text
    extra["dataset"].update({"distill_augment": "swap,cross", "distill_examples": 11907 + 2 * 11907})
    (extra_dir / "results.json").write_text(json.dumps(extra))
    text = hub.render_model_card(extra_dir, REPO_ID).text
    expected = (
        "the training texts of `mrpc`, `rte` and augmented copies of the training texts (`swap`, `cross`) "
        "(29,972 examples), unlabeled (the teacher's outputs are the targets)"
    )
    assert f"| Extra distillation inputs | {expected} |" in text


def _copy_of(output_dir: Path, folder: Path) -> Path:
    """A copy of the output folder's files in `folder`, for a test that edits its results.json."""
    folder.mkdir()
    for path in output_dir.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_the_card_names_the_held_out_split_and_the_stage_end_kept(tmp_path, output_dir, card):
    assert "Model selection" not in str(card)  # a run that held nothing out: no row
    folder = _copy_of(output_dir, tmp_path / "selected")
    results = json.loads((folder / "results.json").read_text())
    results["validation"] = {"examples": 400, "fraction": 0.1}
    results["model_selection"] = {"metric": "deployable_accuracy", "best": 0.84, "best_step": 76, "restored": True}
    (folder / "results.json").write_text(json.dumps(results))

    text = str(hub.render_model_card(folder, REPO_ID))
    row = next(line for line in text.splitlines() if line.startswith("| Model selection |"))
    assert "10% of the training split (400 examples)" in row and "step 76" in row
    assert "`--keep_best_deployable`" in row and "an earlier stage end than the last" in row
    assert "at the end of each distillation stage, on the held-out part of the training split" in text

    results["model_selection"] = None
    (folder / "results.json").write_text(json.dumps(results))
    text = str(hub.render_model_card(folder, REPO_ID))
    assert "the last stage end is the model" in text and "keep_best_deployable" not in text


def test_card_names_the_attention_sinks_beside_the_rule_for_n():
    from had_hf import HADConfig
    from had_hf.hub.card_rows import top_n_text

    assert top_n_text(HADConfig(top_n=30)) == "30"
    assert top_n_text(HADConfig(top_n_ratio=0.117, sink_keys=1)) == (
        "ceil(0.117 × number of keys), and the first 1 valid key(s) of each query (attention sinks)"
    )


def test_the_card_names_each_stages_losses_and_the_students_dropout(tmp_path, output_dir, card):
    assert "| Student dropout |" not in str(card)  # the run did not set it: no row
    folder = _copy_of(output_dir, tmp_path / "losses")
    results = json.loads((folder / "results.json").read_text())
    training_args = {"attention_loss": True, "attention_loss_weight": 1.0, "ste_attention_loss_weight": 0.0,
                     "refinement_attention_loss_weight": 0.0}  # fmt: skip
    results["training_args"] = {**results["training_args"], **training_args}
    results["script_args"] = {**(results.get("script_args") or {}), "student_dropout": 0.0}
    (folder / "results.json").write_text(json.dumps(results))

    lines = str(hub.render_model_card(folder, REPO_ID)).splitlines()
    losses = next(line for line in lines if line.startswith("| Losses |"))
    assert "tanh and sign stages 1, STE stage 0, refinement stage 0" in losses
    assert "| Student dropout | 0 in every dropout layer (`--student_dropout`) |" in lines

    # unset, the STE stage's weight is the stages 1-2 one; without the attention loss, the output KL alone
    results["training_args"].update(ste_attention_loss_weight=None, attention_loss_weight=0.5)
    (folder / "results.json").write_text(json.dumps(results))
    losses = next(line for line in str(hub.render_model_card(folder, REPO_ID)).splitlines() if "| Losses |" in line)
    assert "tanh and sign stages 0.5, STE stage 0.5, refinement stage 0" in losses
    results["training_args"]["attention_loss"] = False
    (folder / "results.json").write_text(json.dumps(results))
    assert "output KL alone in every stage" in str(hub.render_model_card(folder, REPO_ID))
