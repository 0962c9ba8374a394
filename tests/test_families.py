"""Every supported family, with tiny `from_config` models: sanity vs eager, binary stage vs a naive loop, masks,
save/load, generation with a cache, and the unsupported-model error."""

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import had_hf
from had_hf import HADConfig
from had_hf.attention import boolean_mask_function
from tests.conftest import build_model, model_inputs


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits


def _naive_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None, **kw):
    """Independent float64 per-row implementation of HAD's binary stage (with T5's bias and GQA)."""
    config = module._had_config
    sigma_q, sigma_k = config.sigmas(module._had_name)
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    scaling = dim**-0.5 if scaling is None else scaling
    alpha = sigma_q * sigma_k * scaling
    top_n = config.num_kept(k_len)
    if attention_mask is None:
        attention_mask = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool)
    out = torch.zeros(batch, heads, q_len, value.shape[-1], dtype=torch.float64)
    q_sign = torch.where(query >= 0, 1, -1).tolist()
    k_sign = torch.where(key >= 0, 1, -1).tolist()
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // kv_heads)
            for i in range(q_len):
                scored = []
                for j in range(k_len):
                    if not bool(attention_mask[b, 0, i, j]):
                        continue
                    hamming = sum(1 for x, y in zip(q_sign[b][h][i], k_sign[b][g][j]) if x != y)
                    logit = alpha * (dim - 2 * hamming)
                    if position_bias is not None:
                        logit += float(position_bias[min(b, position_bias.shape[0] - 1), h, i, j])
                    scored.append((logit, j))
                scored.sort(key=lambda item: (-item[0], item[1]))
                kept = scored[:top_n]
                if not kept:
                    continue
                exps = [math.exp(s - kept[0][0]) for s, _ in kept]
                for (_, j), e in zip(kept, exps):
                    out[b, h, i] += e / sum(exps) * value[b, g, j].double()
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("naive_had_test", _naive_forward)
AttentionMaskInterface.register("naive_had_test", boolean_mask_function)


def test_large_c_tanh_with_all_keys_equals_eager(family):
    model = build_model(family)
    inputs = model_inputs(family)
    expected = _outputs(model, inputs)
    had_hf.convert(model, HADConfig(top_n=1000))
    had_hf.set_stage(model, "tanh", c=1e6)
    got = _outputs(model, inputs)
    if family == "llama":
        # left-padded positions attend to no valid key: HAD gives zeros there where eager averages the padding
        real = inputs["attention_mask"].bool()
        got, expected = got[real], expected[real]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_binary_stage_matches_naive_loop_in_the_model(family):
    model = build_model(family)
    inputs = model_inputs(family)
    names = None
    config = HADConfig(top_n=3)
    had_hf.convert(model, config)
    names = [model.get_submodule(n)._had_name for n in had_hf.integration.attention_module_names(model)]
    config.sigma_q = {name: 0.5 + 0.1 * i for i, name in enumerate(names)}
    config.sigma_k = {name: 1.5 - 0.1 * i for i, name in enumerate(names)}
    probe = had_hf.attention.CALL_PROBE
    probe.active, calls_before = True, probe.calls
    try:
        got = _outputs(model, inputs)
    finally:
        probe.active = False
    assert probe.calls > calls_before, "the model did not call hamming_topk"
    had_hf.integration.set_attention(model, "naive_had_test")  # also into T5's stacks on transformers 5.17
    expected = _outputs(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    had_hf.integration.set_attention(model, "eager")
    assert not torch.allclose(_outputs(model, inputs), got, atol=1e-6, rtol=0), "HAD output equals dense output"


@pytest.mark.parametrize("family_name", ["bert", "roberta", "t5"])
def test_padding_is_respected(family_name):
    model = had_hf.convert(build_model(family_name), HADConfig(top_n=2))
    inputs = model_inputs(family_name)
    changed = {k: v.clone() for k, v in inputs.items()}
    pad = inputs["attention_mask"] == 0
    changed["input_ids"][pad] = (changed["input_ids"][pad] + 7) % 90 + 3
    with torch.no_grad():
        if family_name == "t5":
            a = model.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])[0]
            b = model.get_encoder()(input_ids=changed["input_ids"], attention_mask=changed["attention_mask"])[0]
        else:
            a = model.base_model(**inputs).last_hidden_state
            b = model.base_model(**changed).last_hidden_state
    keep = ~pad
    torch.testing.assert_close(a[keep], b[keep])
    assert not torch.allclose(a[pad], b[pad])


def test_output_attentions_are_sparse_with_n_entries():
    model = had_hf.convert(build_model("bert"), HADConfig(top_n=3))
    inputs = model_inputs("bert")
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    valid_counts = inputs["attention_mask"].sum(-1)
    for layer in attentions:
        nonzero = (layer > 0).sum(-1)  # (B, H, q)
        for b in range(layer.shape[0]):
            assert (nonzero[b] <= min(3, int(valid_counts[b]))).all()
        torch.testing.assert_close(layer.sum(-1), torch.ones_like(layer.sum(-1)))


def test_t5_cross_attention_can_stay_dense():
    model = had_hf.convert(build_model("t5"), HADConfig(top_n=2, binarize_cross_attention=False))
    inputs = model_inputs("t5", padding=False)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    assert all(((a > 0).sum(-1) <= 2).all() for a in out.encoder_attentions + out.decoder_attentions)
    assert all(((a > 0).sum(-1) == inputs["input_ids"].shape[1]).all() for a in out.cross_attentions)
    cross = [
        n for n, m in model.named_modules() if getattr(m, "_had_is_cross", False) and n.endswith("EncDecAttention")
    ]
    assert len(cross) == 2


@pytest.mark.parametrize("family_name", ["bert", "vit", "t5", "llama"])
def test_save_and_reload_gives_identical_outputs(tmp_path, family_name):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    auto = {
        "bert": AutoModelForSequenceClassification,
        "vit": AutoModelForImageClassification,
        "t5": AutoModelForSeq2SeqLM,
        "llama": AutoModelForCausalLM,
    }[family_name]
    model = build_model(family_name)
    config = HADConfig(top_n=3)
    had_hf.convert(model, config)
    names = [model.get_submodule(n)._had_name for n in had_hf.integration.attention_module_names(model)]
    config.sigma_q = {n: 0.9 for n in names}
    config.sigma_k = {n: 1.1 for n in names}
    inputs = model_inputs(family_name)
    expected = _outputs(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "hamming_topk"
    assert reloaded.config.quantization_config == config
    torch.testing.assert_close(_outputs(reloaded, inputs), expected, atol=0, rtol=0)


@pytest.mark.parametrize("family_name", ["t5", "llama"])
def test_generate_with_cache_equals_without_cache(family_name):
    model = had_hf.convert(build_model(family_name), HADConfig(top_n=3))
    inputs = model_inputs(family_name, batch=2, length=7)
    inputs.pop("decoder_input_ids", None)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert cached.shape[1] > inputs["input_ids"].shape[1] - (family_name == "t5") * 10
    assert torch.equal(cached, uncached)


def test_unsupported_model_raises_naming_the_class():
    from transformers import DebertaV2Config, DebertaV2Model

    model = DebertaV2Model(
        DebertaV2Config(
            vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
        )
    )
    with pytest.raises(had_hf.UnsupportedModelError, match="DebertaV2Model"):
        had_hf.convert(model, HADConfig())


class _SelfMixer(torch.nn.Module):
    """Dense attention computed in place, ignoring the attention interface (as some model codes do)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj = torch.nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, hidden):
        q, k, v = self.proj(hidden).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_forward_that_never_calls_the_function_fails_loudly_eager_or_compiled():
    from transformers import PretrainedConfig, PreTrainedModel

    class ToyModel(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.mixer = _SelfMixer(config)

        def forward(self, hidden, **kwargs):
            return self.mixer(hidden)

    for compiled in [False, True]:  # compiled whole, the check's hooks run traced
        model = had_hf.convert(ToyModel(PretrainedConfig(hidden_size=8)), HADConfig(top_n=3, target_modules=["mixer"]))
        torch._dynamo.reset()
        with pytest.raises(had_hf.UnsupportedModelError, match="ToyModel ran a forward pass"):
            (torch.compile(model, backend="eager") if compiled else model)(torch.randn(1, 4, 8))
    torch._dynamo.reset()


def test_a_first_forward_that_raises_leaves_the_probe_off_and_the_next_forward_checked():
    """The first-forward check counts attention calls with a module-wide probe: a forward that raises must switch it
    off again (left on, every later call would count, and compiled code would recompile at each), and the check
    moves to the next forward."""
    from had_hf.attention import CALL_PROBE

    model = had_hf.convert(build_model("llama"), HADConfig(top_n=3))
    inputs = model_inputs("llama")
    with pytest.raises(Exception):  # noqa: B017 - any error of the model's own forward
        model(input_ids=inputs["input_ids"][:, :, None])  # a 3-d input_ids: the forward fails
    assert not CALL_PROBE.active
    hooks = len(model._forward_hooks)
    with torch.no_grad():
        model(**inputs)  # checked now: the hooks are removed after it
    assert not CALL_PROBE.active and len(model._forward_hooks) == hooks - 1


@pytest.mark.parametrize("regional", [False, True])
def test_a_compiled_first_forward_compiles_one_graph_and_raises_nothing(regional):
    """The first-forward check leaves no trace in compiled code: compiled whole (its hooks traced, doing nothing) or
    layer by layer (the hooks eager, the attention compiled, which reports that it ran), a HAD model compiles one graph
    per compiled function in its first call and none in the next two (the check's call counter read inside a graph
    made dynamo guard on it, and the second call compile again); layer by layer, the check passes and its hooks go."""
    from tests.test_compile import _fresh_dynamo, _graphs

    model = had_hf.convert(build_model("llama"), HADConfig(top_n=3)).eval()
    inputs = model_inputs("llama")
    hooks = len(model._forward_hooks)
    _fresh_dynamo()
    if regional:
        for index, layer in enumerate(model.model.layers):
            model.model.layers[index] = torch.compile(layer, backend="eager")
        compiled = model
    else:
        compiled = torch.compile(model, backend="eager")
    graphs = []
    with torch.no_grad():
        for _ in range(3):
            compiled(**inputs)
            graphs.append(_graphs())
    _fresh_dynamo()
    assert graphs[0] >= 1 and graphs[0] == graphs[1] == graphs[2], graphs
    assert len(model._forward_hooks) == (hooks - 1 if regional else hooks)
