"""Export of a decoder-only (causal, grouped-query) HAD model: a saved tiny Llama folder through ONNX, golden data
with causal validity, and the CAM report's cost per generated token at several context lengths."""

import json
import logging
import math

import numpy as np
import pytest
import torch

import had_hf
from had_hf import HADConfig
from had_hf.export import HADExportError, export_had, load_golden
from tests.conftest import build_model, model_inputs
from tests.export.test_export import _onnx_session, _run, check_golden_selection, requires_onnxruntime

pytestmark = requires_onnxruntime

TOP_N = 5  # of 16 tokens
LENGTHS = [1024, 2048, 4096, 8192]
HEAD_DIM = 32


def had_llama(sink_keys: int = 0):
    """A tiny Llama as HAD: 2 layers, 4 query heads sharing 2 key/value heads, head_dim 32 (the packed cache word)."""
    import transformers

    torch.manual_seed(0)
    config = build_model("llama").config
    config.head_dim = HEAD_DIM
    teacher = transformers.LlamaForCausalLM(config).eval()
    had_hf.integration.set_attention(teacher, "eager")
    model = had_hf.convert(teacher, HADConfig(top_n=TOP_N, sink_keys=sink_keys))
    had_hf.calibrate(model, [model_inputs("llama", batch=4, length=16)], num_batches=1)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(in-memory model, saved folder, export folder, ExportResult): the export starts from the saved folder."""
    model = had_llama()
    folder = tmp_path_factory.mktemp("decoder") / "had-llama"
    model.save_pretrained(folder)
    output_dir = folder.parent / "bundle"
    result = export_had(folder, output_dir, samples=3, context_length=16)
    return model, folder, output_dir, result


def test_config_is_grouped_query_attention(exported):
    model = exported[0]
    assert model.config.num_key_value_heads < model.config.num_attention_heads


def test_onnx_of_the_prompt_matches_pytorch_with_causal_mask_and_grouped_heads(exported):
    model, _, output_dir, result = exported
    assert result.manifest["task"] == "text-generation"
    assert result.manifest["onnx"]["inputs"] == ["input_ids", "attention_mask"]
    assert result.manifest["onnx"]["outputs"] == ["logits"]  # the prompt graph: no cache inputs or outputs
    assert result.onnx_max_abs_diff < 1e-5
    session = _onnx_session(output_dir / "model.onnx")
    # shapes never traced, left padding as used for generation, and a length below N
    for batch, length in ((1, 16), (3, 11), (2, 4)):
        inputs = model_inputs("llama", batch=batch, length=length, seed=batch + 20)
        with torch.no_grad():
            expected = model(**inputs).logits.numpy()
        received = session.run(["logits"], {name: value.numpy() for name, value in inputs.items()})[0]
        assert received.shape == expected.shape
        assert np.abs(received - expected).max() < 1e-5, (batch, length)
    # causality in the graph: a later token never changes an earlier position's logits
    ids = model_inputs("llama", batch=1, length=12, seed=3, padding=False)
    changed = {name: value.clone() for name, value in ids.items()}
    changed["input_ids"][0, -1] = (changed["input_ids"][0, -1] + 1) % model.config.vocab_size
    first, second = (
        session.run(["logits"], {name: value.numpy() for name, value in feed.items()})[0] for feed in (ids, changed)
    )
    np.testing.assert_array_equal(first[:, :-1], second[:, :-1])
    assert np.abs(first[:, -1] - second[:, -1]).max() > 0


def test_golden_data_has_causal_validity_and_the_independent_selection(exported):
    model, _, output_dir, _ = exported
    golden = load_golden(output_dir)
    mask = golden.inputs["attention_mask"].astype(bool)  # (S, k)
    assert not mask.all()  # some samples are padded
    positions = np.arange(mask.shape[1])
    causal = positions[None, :] <= positions[:, None]  # (q, k): key k at or before query q
    for layer in golden.layers:
        assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (4, 2, HEAD_DIM)
        assert golden.manifest["layers"][layer.index]["num_kv_heads"] == 2
        for index in range(golden.manifest["samples"]):
            np.testing.assert_array_equal(layer.valid[index, 0].astype(bool), causal & mask[index][None, :])
            # grouped-query attention: query heads 0, 1 read key/value head 0, heads 2, 3 read head 1
            keys = layer.key_bits[index]
            assert np.array_equal(keys[0], keys[1]) and np.array_equal(keys[2], keys[3])
            assert not np.array_equal(keys[0], keys[2])
    check_golden_selection(model, golden)  # bits -> scores -> ranked by hand, and the model's own selection
    first_row_kept = golden.layers[0].kept_indices[0, :, 0]  # query 0 sees only key 0
    assert (first_row_kept[:, 0] == 0).all() and (first_row_kept[:, 1:] == -1).all()


def test_exported_folder_loads_as_had_and_generates_with_the_had_cache(exported):
    from transformers import AutoModelForCausalLM

    from had_hf.cache import HADPackedCache
    from had_hf.evaluation.causal_lm import forward_parameters

    _, _, output_dir, _ = exported
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    assert reloaded.config._attn_implementation == "hamming_topk"
    prompt = model_inputs("llama", batch=1, length=10, seed=7, padding=False)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = HADPackedCache(config=reloaded.config)
        cache_kwarg = "cache" if "cache" in forward_parameters(reloaded) else "past_key_values"  # transformers 5.17
        cached = reloaded.generate(**prompt, **{cache_kwarg: cache}, **settings)
        recomputed = reloaded.generate(**prompt, use_cache=False, **settings)
    assert cache.get_seq_length() == cached.shape[1] - 1  # the HAD cache held every key but the last token's
    torch.testing.assert_close(cached, recomputed, rtol=0, atol=0)


def _hand_costs(n: int) -> dict:
    """The tiny Llama's attention per generated token at n cached keys, N = TOP_N, written out from the HAD paper's
    table (one query, 256 keys of width 1024, N = 30), the scaling rules and the CAMformer cycle counts."""
    layers, heads, kv_heads, d = 2, 4, 2, HEAD_DIM
    query_scale, key_scale, head_scale = n * heads * d / (256 * 1024), n * kv_heads * d / (256 * 1024), heads * n / 256
    sorter = math.log2(TOP_N) / math.log2(30)
    kept_fraction = (TOP_N / n) / (30 / 256)
    ns_per_token = 1 / 500 * 1e3  # one query vector per cycle at 500 MHz
    bf16_power = 12.73 * query_scale + 0.031 * head_scale + 12.73 * query_scale
    had_power = (
        0.127 * query_scale + 0.009 * head_scale * sorter + 0.024 * head_scale + 3.141 * query_scale * kept_fraction
    )
    bf16_area = 15.88 * query_scale + 0.035 * head_scale + 15.88 * query_scale
    had_area = (
        1.108 * key_scale + 0.008 * head_scale * sorter + 0.017 * head_scale + 5.591 * query_scale * kept_fraction
    )
    log_n, log_kept = math.ceil(math.log2(n)), math.ceil(math.log2(TOP_N))
    softmax_fixed = 2 + 1 + 3  # scaler, exponent LUT, divider
    bf16_cycles = 4 * (1 + 5) + softmax_fixed + log_n + 4 * (1 + log_n)  # head_dim 32: 5 adder levels
    group = heads // kv_heads  # the two query heads of a group search their CAM one after another, then one ADC
    had_cycles = (group * 1 + 2) + 6 * math.ceil(math.log2(n / TOP_N)) + softmax_fixed + log_kept + 4 * (1 + log_kept)
    return {
        "bf16": {"energy_per_token_nj": layers * bf16_power * ns_per_token, "area_mm2": layers * bf16_area,
                 "latency_cycles": layers * bf16_cycles},
        "had": {"energy_per_token_nj": layers * had_power * ns_per_token, "area_mm2": layers * had_area,
                "latency_cycles": layers * had_cycles},
        "cam_key_bits": layers * n * kv_heads * d,
    }  # fmt: skip


def test_cam_report_gives_the_cost_per_generated_token_at_1k_to_8k(exported):
    _, _, output_dir, result = exported
    report = json.loads((output_dir / "cam_report.json").read_text())
    rows = report["per_generated_token"]
    assert [row["context_length"] for row in rows] == LENGTHS  # the default lengths
    assert result.manifest["cam_report"]["generation_lengths"] == LENGTHS
    for row in rows:
        n = row["context_length"]
        expected = _hand_costs(n)
        assert row["top_n"] == TOP_N and row["cam_key_bits"] == expected["cam_key_bits"]
        assert row["bf16_key_bits"] == 16 * expected["cam_key_bits"]
        for design in ("bf16", "had"):
            for metric, value in expected[design].items():
                assert row[design][metric] == pytest.approx(value, rel=1e-12), (n, design, metric)
        assert row["had"]["latency_us"] == pytest.approx(row["had"]["latency_cycles"] / 500)
        ratio = row["ratio_had_over_bf16"]["energy_per_token_nj"]
        assert ratio == pytest.approx(expected["had"]["energy_per_token_nj"] / expected["bf16"]["energy_per_token_nj"])
    # BF16 reads every cached key: its energy per token is linear in n; HAD's grows less (its A.V reads N rows)
    energy = {design: [row[design]["energy_per_token_nj"] for row in rows] for design in ("bf16", "had")}
    assert energy["bf16"] == pytest.approx([energy["bf16"][0] * n / LENGTHS[0] for n in LENGTHS])
    assert all(later > earlier for earlier, later in zip(energy["had"], energy["had"][1:]))
    assert all(later < 2 * earlier for earlier, later in zip(energy["had"], energy["had"][1:]))
    markdown = (output_dir / "cam_report.md").read_text()
    assert "## Per generated token (decoder)" in markdown and "| 8,192 | 5 |" in markdown
    assert "per generated token (decoder)" in result.summary()


def test_a_model_with_attention_sinks_exports_its_rule(tmp_path):
    from had_hf.export.cam import AttentionGeometry, cam_cost_report

    model = had_llama(sink_keys=1)
    result = export_had(model, tmp_path / "out", samples=3, context_length=16, generation_lengths=[64, 1024])
    assert result.onnx_max_abs_diff < 1e-5  # the ONNX graph keeps the sinks too (else its outputs would differ)
    golden = load_golden(tmp_path / "out")
    for layer in golden.layers:
        assert (layer.top_n, layer.sink_keys, layer.kept_indices.shape[-1]) == (TOP_N, 1, TOP_N + 1)
    check_golden_selection(model, golden)
    # some rows kept the first valid key beside a full top N: the sink changed the kept sets
    assert any((layer.kept_indices[..., -1] >= 0).any() for layer in golden.layers)
    code = (tmp_path / "out" / "golden" / "README.md").read_text().split("```python\n")[1].split("```")[0]
    exec(compile(code.replace('"golden"', repr(str(tmp_path / "out" / "golden"))), "README.md", "exec"), {})
    # the CAM report costs N + 1 kept keys per query
    report = json.loads((tmp_path / "out" / "cam_report.json").read_text())
    assert report["operating_point"]["top_n_rule"] == {"top_n": TOP_N, "top_n_ratio": None, "sink_keys": 1}
    assert [row["top_n"] for row in report["per_generated_token"]] == [TOP_N + 1, TOP_N + 1]
    plain = cam_cost_report(AttentionGeometry.from_config(model.config), 16, top_n=TOP_N + 1)
    assert report["model_total"]["had"]["total"] == pytest.approx(plain["model_total"]["had"]["total"], rel=1e-12)
    assert "the first 1 key(s), attention sinks" in (tmp_path / "out" / "cam_report.md").read_text()


def test_chosen_generation_lengths(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="had_hf.export.exporter"):
        result = export_had(had_llama(), tmp_path / "out", context_length=8, generation_lengths=[300, 100, 300])
    assert [row["context_length"] for row in result.cam_report["per_generated_token"]] == [100, 300]
    assert "up to n = 300, beyond the model's 128 positions" in caplog.text
    assert result.cam_report["per_generated_token"][0]["had"]["energy_per_token_nj"] == pytest.approx(
        _hand_costs(100)["had"]["energy_per_token_nj"], rel=1e-12
    )


@pytest.mark.parametrize(
    "lengths, message",
    [
        ([], "non-empty list of positive integers"),
        ([1024, 0], r"\[0\] not allowed"),
        ([-8], r"\[-8\] not allowed"),
        ([1024.0], r"\[1024.0\] not allowed"),
        ("1024", "list of positive integers"),
    ],
)
def test_bad_generation_lengths_are_refused_before_any_work(lengths, message, tmp_path):
    with pytest.raises(HADExportError, match=message):
        export_had(torch.nn.Linear(2, 2), tmp_path / "out", generation_lengths=lengths)  # checked before the model
    assert not (tmp_path / "out").exists()


def test_generation_lengths_are_refused_for_an_encoder(tmp_path):
    model = had_hf.convert(build_model("bert"), HADConfig(top_n=TOP_N))
    had_hf.calibrate(model, [model_inputs("bert", batch=4, length=16)], num_batches=1)
    with pytest.raises(HADExportError, match="applies to decoder-only models.*text-classification"):
        export_had(model, tmp_path / "out", generation_lengths=[1024])
    assert not (tmp_path / "out").exists()
    assert "per_generated_token" not in export_had(model, tmp_path / "out", context_length=8).cam_report


def test_cli_generation_lengths(exported, tmp_path):
    _, folder, _, _ = exported
    done = _run(
        "-m", "had_hf.cli", "export", "--model", str(folder), str(tmp_path / "out"), "--context-length", "8",
        "--generation-lengths", "512,2048",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "cam_report.json").read_text())
    assert [row["context_length"] for row in report["per_generated_token"]] == [512, 2048]
    for flag, message in (("1024,x", "expected comma-separated integers"), (",", "non-empty list")):
        refused = _run("-m", "had_hf.cli", "export", "--model", str(folder), str(tmp_path / "no"),
                       "--generation-lengths", flag)  # fmt: skip
        assert refused.returncode != 0 and message in refused.stderr and "Traceback" not in refused.stderr
        assert not (tmp_path / "no").exists()


def test_deeper_models_are_validated_on_proportionally_fewer_tokens(exported):
    """A sign flip of a near-zero query or key element between runtimes cascades through the later layers, so the
    enforced ONNX check keeps the layers x tokens of a draw near BERT-base's (12 layers x 64 tokens)."""
    from transformers import BertConfig, LlamaConfig

    from had_hf.export.onnx_check import validation_length

    smollm2 = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    assert validation_length(smollm2, 512) == 64 * 12 // 30 == 25
    assert validation_length(BertConfig(num_hidden_layers=12), 512) == 64
    assert validation_length(BertConfig(num_hidden_layers=2), 16) == 16
    assert validation_length(LlamaConfig(num_hidden_layers=400), 512) == 4  # never below the shortest sample
    assert exported[3].manifest["onnx"]["validation"]["length"] == 16  # the tiny model: its whole sample length
