import pytest
import torch

import had_hf
from had_hf import HADConfig
from tests.conftest import build_model, model_inputs


def _batches(count):
    return [
        model_inputs("bert", batch=4, length=8, seed=10 + i) | {"labels": torch.zeros(4, dtype=torch.long)}
        for i in range(count)
    ]


def test_calibration_equals_direct_std_of_queries_and_keys():
    model = had_hf.convert(build_model("bert"), HADConfig(top_n=3))
    batches = _batches(5)
    config = had_hf.calibrate(model, batches, num_batches=3)
    assert config is model.config.quantization_config
    assert model.config._attn_implementation == "hamming_topk"  # restored after the dense pass
    for layer_index in range(2):
        attention = model.bert.encoder.layer[layer_index].attention.self
        stds_q, stds_k = [], []
        for batch in batches[:3]:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            reference = build_model("bert")  # dense eager model with the same weights (same seed)
            with torch.no_grad():
                hidden = reference.bert(**inputs, output_hidden_states=True).hidden_states[layer_index]
            stds_q.append(attention.query(hidden).std().item())
            stds_k.append(attention.key(hidden).std().item())
        name = f"encoder.layer.{layer_index}.attention.self"  # relative to the base model
        assert config.sigma_q[name] == pytest.approx(sum(stds_q) / 3, rel=1e-5)
        assert config.sigma_k[name] == pytest.approx(sum(stds_k) / 3, rel=1e-5)


def test_per_head_calibration_equals_direct_std_of_each_head():
    model = had_hf.convert(build_model("bert"), HADConfig(top_n=3, sigma_per_head=True))
    batches = _batches(3)
    config = had_hf.calibrate(model, batches, num_batches=2)
    heads = model.config.num_attention_heads
    reference = build_model("bert")
    for layer_index in range(2):
        attention = model.bert.encoder.layer[layer_index].attention.self
        per_batch_q, per_batch_k = [], []
        for batch in batches[:2]:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with torch.no_grad():
                hidden = reference.bert(**inputs, output_hidden_states=True).hidden_states[layer_index]
            for projection, out in ((attention.query, per_batch_q), (attention.key, per_batch_k)):
                states = projection(hidden).detach().double()  # (B, T, H * dh)
                states = states.view(*states.shape[:2], heads, -1)
                out.append([states[:, :, h].std().item() for h in range(heads)])
        name = f"encoder.layer.{layer_index}.attention.self"
        assert len(config.sigma_q[name]) == heads
        for h in range(heads):
            assert config.sigma_q[name][h] == pytest.approx((per_batch_q[0][h] + per_batch_q[1][h]) / 2, rel=1e-5)
            assert config.sigma_k[name][h] == pytest.approx((per_batch_k[0][h] + per_batch_k[1][h]) / 2, rel=1e-5)
    assert config.sigma_per_head and config.has_per_head_sigma
    # the model runs with them, and they survive the config round trip
    model(**model_inputs("bert"))
    again = HADConfig.from_dict(config.to_dict())
    assert again.sigma_q == config.sigma_q and again.sigma_per_head


def test_per_head_calibration_of_grouped_query_attention_has_one_sigma_k_per_kv_head():
    model = had_hf.convert(build_model("llama"), HADConfig(top_n=3, sigma_per_head=True))
    batches = [model_inputs("llama", batch=2, length=8, seed=20 + i) for i in range(2)]
    config = had_hf.calibrate(model, batches, num_batches=2)
    name = next(iter(config.sigma_q))
    assert len(config.sigma_q[name]) == model.config.num_attention_heads
    assert len(config.sigma_k[name]) == model.config.num_key_value_heads
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    model(**model_inputs("llama"))


def test_calibration_requires_a_had_model_and_batches():
    with pytest.raises(ValueError, match="had_hf.convert"):
        had_hf.calibrate(build_model("bert"), _batches(1))
    model = had_hf.convert(build_model("bert"), HADConfig())
    with pytest.raises(ValueError, match="empty dataloader"):
        had_hf.calibrate(model, [])
