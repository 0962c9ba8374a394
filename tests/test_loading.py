"""A HAD checkpoint can never come back as dense attention without anyone noticing."""

import json
import subprocess
import sys
import textwrap

import torch

import had_hf
from had_hf import HADConfig
from tests.conftest import build_model, model_inputs


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def _save_had_bert(path):
    model = had_hf.convert(build_model("bert"), HADConfig(top_n=3))
    model.save_pretrained(path)
    inputs = model_inputs("bert")
    torch.save({"inputs": inputs, "logits": model(**inputs).logits.detach()}, path / "expected.pt")


def test_fresh_process_with_had_hf_reloads_as_had(tmp_path):
    _save_had_bert(tmp_path)
    result = _run(f"""
        import torch, had_hf
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r}).eval()
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        assert model.config._attn_implementation == "hamming_topk", model.config._attn_implementation
        assert torch.equal(model(**saved["inputs"]).logits, saved["logits"])
        print("HAD-OK")
    """)
    assert "HAD-OK" in result.stdout, result.stderr


def test_fresh_process_without_had_hf_refuses_to_load(tmp_path):
    _save_had_bert(tmp_path)
    result = _run(f"""
        from transformers import AutoModelForSequenceClassification
        AutoModelForSequenceClassification.from_pretrained({str(tmp_path)!r})
        print("LOADED-DENSE")
    """)
    assert "LOADED-DENSE" not in result.stdout
    assert result.returncode != 0
    assert 'attn_implementation="hamming_topk"' in result.stderr


def test_from_config_of_a_saved_had_config_uses_its_settings(tmp_path):
    # AutoConfig leaves the saved HADConfig a dict (no quantizer runs): the attention must still use its top_n
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _save_had_bert(tmp_path)
    saved = torch.load(tmp_path / "expected.pt")
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config.quantization_config, dict) and config.quantization_config["top_n"] == 3
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="hamming_topk").eval()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    model.load_state_dict(reloaded.state_dict())
    with torch.no_grad():
        assert torch.equal(model(**saved["inputs"]).logits, saved["logits"])


def test_asking_for_dense_attention_still_gives_had(tmp_path):
    from transformers import AutoModelForSequenceClassification

    _save_had_bert(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert model.config._attn_implementation == "hamming_topk"


def test_from_pretrained_with_had_config_converts_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForSequenceClassification

    build_model("bert").save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="hamming_topk", quantization_config=HADConfig(top_n=4)
    )
    assert model.config._attn_implementation == "hamming_topk"
    assert model.config.quantization_config.top_n == 4
    assert not model.is_quantized  # full-precision weights: trainable and castable
    model.half()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved  # the user's original checkpoint is untouched


def test_revert_gives_dense_attention_and_plain_config(tmp_path):
    model = had_hf.convert(build_model("bert"), HADConfig(top_n=3))
    had_hf.revert(model, "eager")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved and "attn_implementation" not in saved
    torch.testing.assert_close(
        model(**model_inputs("bert")).logits, build_model("bert")(**model_inputs("bert")).logits
    )


def test_registration_is_idempotent_and_additive():
    from transformers import AttentionInterface

    before = dict(AttentionInterface._global_mapping)
    had_hf.register()
    had_hf.register()
    assert dict(AttentionInterface._global_mapping) == before
    assert before["sdpa"].__module__.startswith("transformers")
