"""HAD behaves like any attention where transformers' own model tests expect it to: reloading, caches, padding,
`from_config`, head classes, `torch.compile`, packed caches with position biases."""

import pytest
import torch
import transformers as tf

import had_hf
from had_hf import HADConfig
from had_hf.attention import UnsetModuleError
from had_hf.cache import HADPackedCache
from tests.conftest import VOCAB, build_model, model_inputs


def _llama(seed: int = 0, head_dim: int = 16):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=4 * head_dim, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def test_reload_with_the_config_object_of_a_converted_model(tmp_path):
    """transformers reads `quantization_config.get(...)` when `config=model.config` is passed (it crashed)."""
    model = had_hf.convert(build_model("bert"), HADConfig(top_n=3))
    model.save_pretrained(tmp_path)
    reloaded = tf.BertForSequenceClassification.from_pretrained(tmp_path, config=model.config).eval()
    assert reloaded.config._attn_implementation == "hamming_topk"
    inputs = model_inputs("bert")
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("rule", [{"top_n_ratio": 0.25}, {"top_n": 3}], ids=["ratio", "fixed"])
def test_full_forward_equals_incremental_left_padded_and_static_cache(rule):
    """N counts the keys a query may attend to: the same for a query whether it is computed in one forward, token by
    token with a cache, behind left padding, or against a static cache's unfilled slots."""
    model = had_hf.convert(_llama(), HADConfig(**rule))
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        for cache in (tf.DynamicCache(), tf.StaticCache(config=model.config, max_cache_len=32)):
            steps = [model(input_ids=ids[:, :4], use_cache=True, cache_position=torch.arange(4),
                           **{_cache_kwarg(model): cache}).logits]  # fmt: skip
            for i in range(4, 12):
                out = model(input_ids=ids[:, i : i + 1], use_cache=True, cache_position=torch.tensor([i]),
                            **{_cache_kwarg(model): cache})  # fmt: skip
                steps.append(out.logits)
            torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5, msg=type(cache).__name__)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
        padded = model(
            input_ids=torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1),
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        ).logits[:, 3:]
    torch.testing.assert_close(padded, full, atol=1e-5, rtol=1e-5)


def test_generate_with_static_and_dynamic_caches_gives_the_same_tokens():
    model = had_hf.convert(_llama(seed=2), HADConfig(top_n_ratio=0.3))
    inputs = model_inputs("llama", batch=2, length=7)
    tokens = {}
    for name in ("dynamic", "static"):
        with torch.no_grad():
            tokens[name] = model.generate(
                **inputs, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=name
            )
    assert torch.equal(tokens["static"], tokens["dynamic"])


def _calibrated_t5(path):
    model = build_model("t5")
    had_hf.convert(model, HADConfig(top_n=3, binarize_cross_attention=False))
    had_hf.calibrate(model, [model_inputs("t5")], num_batches=1)
    model.save_pretrained(path)
    return model


def test_from_config_refuses_per_layer_settings_until_converted(tmp_path):
    """`AutoConfig` + `from_config` builds the model without had_hf's loading hook: running it would ignore the
    calibrated sigmas and `binarize_cross_attention=False`, so it is refused until `had_hf.convert(model)`."""
    expected_model = _calibrated_t5(tmp_path)
    inputs = model_inputs("t5")
    config = tf.AutoConfig.from_pretrained(tmp_path)
    model = tf.AutoModelForSeq2SeqLM.from_config(config).eval()
    model.load_state_dict(expected_model.state_dict())
    with pytest.raises(UnsetModuleError, match=r"had_hf.convert\(model\)"), torch.no_grad():
        model(**inputs)
    had_hf.convert(model)  # takes the HADConfig saved in model.config
    assert model.config.quantization_config.sigma_q == expected_model.config.quantization_config.sigma_q
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected_model(**inputs).logits)


def test_sigma_is_found_whatever_head_class_loads_the_weights(tmp_path):
    """Calibrated as BertForSequenceClassification (modules under `bert.`), reloaded as BertModel (no prefix)."""
    classifier = had_hf.convert(build_model("bert"), HADConfig(top_n=3))
    had_hf.calibrate(classifier, [model_inputs("bert")], num_batches=1)
    assert set(classifier.config.quantization_config.sigma_q) == {
        "encoder.layer.0.attention.self",
        "encoder.layer.1.attention.self",
    }
    classifier.save_pretrained(tmp_path)
    base = tf.AutoModel.from_pretrained(tmp_path).eval()
    inputs = model_inputs("bert")
    with torch.no_grad():
        expected = classifier.bert(**inputs).last_hidden_state
        torch.testing.assert_close(base(**inputs).last_hidden_state, expected)
        # an uncalibrated reload (sigma = 1) differs: the test would see sigmas being dropped
        had_hf.convert(base, HADConfig(top_n=3))
        assert not torch.allclose(base(**inputs).last_hidden_state, expected, atol=1e-4)


def test_sigmas_saved_under_the_head_model_prefix_are_still_found():
    """Checkpoints calibrated before names were relative to the base model keep working."""
    model = had_hf.convert(build_model("bert"), HADConfig(top_n=3))
    had_hf.calibrate(model, [model_inputs("bert")], num_batches=1)
    inputs = model_inputs("bert")
    with torch.no_grad():
        expected = model(**inputs).logits
    config = model.config.quantization_config
    legacy = HADConfig(
        top_n=3,
        sigma_q={f"bert.{name}": value for name, value in config.sigma_q.items()},
        sigma_k={f"bert.{name}": value for name, value in config.sigma_k.items()},
    )
    had_hf.convert(model, legacy)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected)


@pytest.mark.parametrize("family_name", ["bert", "llama"])
def test_compile_fullgraph_without_recompilation(family_name):
    """One graph, no break (fullgraph), no recompilation across calls, outputs equal to eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = had_hf.convert(build_model(family_name), HADConfig(top_n=3, sigma_q={}, sigma_k={}))
    inputs = model_inputs(family_name)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # traces the op through its fake implementation
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        expected = model(**inputs).logits
        for _ in range(3):
            torch.testing.assert_close(compiled(**inputs).logits, expected, atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1
    assert counter.op_count > 0


@pytest.mark.parametrize(
    "device, backend",
    [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)],
)
def test_compile_fullgraph_decode_step_with_the_packed_cache(device, backend):
    model = had_hf.convert(_llama(head_dim=32), HADConfig(top_n=3)).to(device)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3)).to(device)

    def step(token, cache, position):
        return model(input_ids=token, use_cache=True, cache_position=position, **{_cache_kwarg(model): cache}).logits

    def decode(step_function):
        cache = HADPackedCache(config=model.config)
        with torch.no_grad():
            token = model(input_ids=ids, use_cache=True, **{_cache_kwarg(model): cache}).logits[:, -1:].argmax(-1)
            logits = []
            for i in range(4):
                logits.append(step_function(token, cache, torch.tensor([7 + i], device=device)))
                token = logits[-1][:, -1:].argmax(-1)
        return torch.cat(logits, 1)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    torch.testing.assert_close(decode(compiled), decode(step), atol=1e-5, rtol=1e-5)


def test_packed_cache_keeps_t5_position_bias_exact():
    """T5 decoding with packed keys equals decoding with float keys: the relative position bias reaches the op."""
    torch.manual_seed(0)
    config = tf.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=32, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    model = had_hf.convert(tf.T5ForConditionalGeneration(config).eval(), HADConfig(top_n=3))
    inputs = {k: v for k, v in model_inputs("t5").items() if not k.startswith("decoder_")}
    outputs = {}
    for name, cache in (("float", None), ("packed", HADPackedCache(config=model.config))):
        kwargs = {} if cache is None else {_cache_kwarg(model): tf.EncoderDecoderCache(cache, tf.DynamicCache())}
        with torch.no_grad():
            outputs[name] = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_scores=True,
                                           return_dict_in_generate=True, **kwargs)  # fmt: skip
    assert torch.equal(outputs["float"].sequences, outputs["packed"].sequences)
    for float_scores, packed_scores in zip(outputs["float"].scores, outputs["packed"].scores):
        torch.testing.assert_close(packed_scores, float_scores, atol=1e-5, rtol=1e-5)


def test_opcheck_of_the_attention_op():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 3, 32, generator=generator)
    key = torch.randn(2, 2, 9, 32, generator=generator)
    value = torch.randn(2, 2, 9, 16, generator=generator)
    mask = torch.rand(2, 1, 3, 9, generator=generator) > 0.3
    bias = torch.randn(1, 4, 3, 9, generator=generator)
    packed = had_hf.kernels.pack_sign_bits(key)
    for args in (
        (query, key, value, None, None, False, 4, None, 0.3),
        (query, key, value, mask, bias, False, None, 0.4, 0.3),
        (query, packed, value, mask, None, True, 2, None, 0.5),
    ):
        torch.library.opcheck(torch.ops.had.hamming_topk_attention.default, args)
