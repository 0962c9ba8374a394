"""`HADStaticPackedCache`: preallocated packed-key buffers written in place, equal to the other caches under greedy
`generate()`, and one compiled graph for every decode step (eager equal, no recompilation)."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers as tf
from conftest import VOCAB, model_inputs
from torch._dynamo.testing import CompileCounterWithBackend

import had_hf
from had_hf import HADConfig
from had_hf.cache import HADPackedCache, HADStaticPackedCache, HADStaticPackedLayer
from had_hf.kernels import pack_sign_bits

RULES = [pytest.param({"top_n": 5}, id="top_n"), pytest.param({"top_n_ratio": 0.3}, id="ratio")]


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x names the cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _model(rule: dict, seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    # head_dim 32 (packing needs multiples of 32), two query heads sharing one key/value head
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return had_hf.convert(tf.LlamaForCausalLM(config).eval(), HADConfig(**rule))


class _SharedCounter(CompileCounterWithBackend):
    """A compile counter that `CompileConfig.to_dict()`'s deep copy leaves shared, so the test reads its counts."""

    def __deepcopy__(self, memo):
        return self


def _compile_config(backend) -> tf.CompileConfig:
    """What `generate()` compiles its decode step with; `_compile_all_devices` lets it do so off CUDA too."""
    config = tf.CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True
    return config


def _greedy(model, inputs, cache, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs, **({_cache_kwarg(model): cache} if cache is not None else {}), max_new_tokens=8,
            do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0, **kwargs,
        )  # fmt: skip


def _assert_same_generation(output, expected):
    assert torch.equal(output.sequences, expected.sequences)
    for scores, expected_scores in zip(output.scores, expected.scores, strict=True):
        torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=1e-5)


def test_update_writes_packed_keys_in_place():
    layer = HADStaticPackedLayer(max_cache_len=16)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 7, 64, generator=generator)
    values = torch.randn(2, 3, 7, 64, generator=generator).to(torch.bfloat16)
    packed, cached_values = layer.update(keys[:, :, :5], values[:, :, :5])
    addresses = packed.data_ptr(), cached_values.data_ptr()
    for i in (5, 6):
        packed, cached_values = layer.update(keys[:, :, i : i + 1], values[:, :, i : i + 1])
    assert (packed.data_ptr(), cached_values.data_ptr()) == addresses  # written in place, never reallocated
    assert packed.dtype == torch.int32 and packed.shape == (2, 3, 16, 2)
    assert torch.equal(packed[:, :, :7], pack_sign_bits(keys)) and not packed[:, :, 7:].any()
    assert cached_values.dtype == torch.bfloat16 and torch.equal(cached_values[:, :, :7], values)
    assert int(layer.get_seq_length()) == 7 and layer.get_mask_sizes(1) == (16, 0)
    assert layer.key_memory_bytes() == 2 * 3 * 16 * 8  # d/8 bytes per slot and head
    if hasattr(layer, "crop"):  # transformers' StaticLayer has crop from 5.2x on
        layer.crop(-2)
        packed, _ = layer.update(keys[:, :, :1], values[:, :, :1])
        assert int(layer.get_seq_length()) == 6 and torch.equal(packed[:, :, 5], pack_sign_bits(keys[:, :, 0]))
    layer.reset()
    assert int(layer.get_seq_length()) == 0 and not layer.keys.any()
    with pytest.raises(ValueError, match="multiples of 32"):
        HADStaticPackedLayer(max_cache_len=4).update(torch.randn(1, 1, 1, 48), torch.randn(1, 1, 1, 48))


def test_cache_from_config():
    model = _model({"top_n": 3})
    cache = HADStaticPackedCache(config=model.config, max_cache_len=20)
    assert isinstance(cache, tf.StaticCache) and cache.is_compileable and len(cache.layers) == 2
    assert all(isinstance(layer, HADStaticPackedLayer) for layer in cache.layers)
    cache.early_initialization(batch_size=2, num_heads=1, head_dim=32, dtype=torch.float32, device="cpu")
    assert cache.layers[0].keys.shape == (2, 1, 20, 1) and cache.key_memory_bytes() == 2 * (2 * 20 * 4)
    sliding = tf.LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="sliding_attention"):
        HADStaticPackedCache(config=sliding, max_cache_len=8)


@pytest.mark.parametrize("rule", RULES)
def test_generate_matches_the_packed_and_float_key_caches(rule):
    """Left-padded batch: the unfilled slots and the padding are masked, so N counts the same keys everywhere."""
    model = _model(rule)
    inputs = model_inputs("llama", batch=3, length=9)
    assert not inputs["attention_mask"].all()
    expected = _greedy(model, inputs, tf.DynamicCache())
    _assert_same_generation(_greedy(model, inputs, HADPackedCache(config=model.config)), expected)
    cache = HADStaticPackedCache(config=model.config, max_cache_len=24)
    _assert_same_generation(_greedy(model, inputs, cache), expected)
    assert cache.layers[0].keys.dtype == torch.int32 and int(cache.get_seq_length()) == 9 + 7


@pytest.mark.parametrize("rule", RULES)
def test_compiled_decode_step_is_one_graph_equal_to_eager(rule):
    """fullgraph, and no recompilation over the decode steps: the cache length is a device tensor, the mask spans
    `max_cache_len` whatever the step, and the 2-D attention mask is passed at its final length."""
    model = _model(rule, seed=1)
    inputs = model_inputs("llama", batch=2, length=7)
    prompt_len, max_cache_len = 7, 16
    attention_mask = torch.cat(
        [inputs["attention_mask"], torch.ones(2, max_cache_len - prompt_len, dtype=torch.long)], 1
    )
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    def step(token, cache, position):
        return model(
            input_ids=token, attention_mask=attention_mask, position_ids=positions[:, position], cache_position=position,
            use_cache=True, **{_cache_kwarg(model): cache},
        ).logits  # fmt: skip

    def decode(step_function):
        cache = HADStaticPackedCache(config=model.config, max_cache_len=max_cache_len)
        with torch.no_grad():
            prefill = step(inputs["input_ids"], cache, torch.arange(prompt_len))
            token = prefill[:, -1:].argmax(-1)
            logits = []
            for i in range(4):
                logits.append(step_function(token, cache, torch.tensor([prompt_len + i])))
                token = logits[-1][:, -1:].argmax(-1)
        return torch.cat(logits, 1)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # traces the op through its fake implementation
    compiled = decode(torch.compile(step, backend=counter, fullgraph=True))
    torch.testing.assert_close(compiled, decode(step), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("rule", RULES)
def test_generate_with_the_compiled_forward_gives_the_eager_tokens(rule):
    """generate() compiles the decode step itself for a compileable cache (here forced on the CPU)."""
    model = _model(rule, seed=2)
    inputs = model_inputs("llama", batch=3, length=9)
    expected = _greedy(model, inputs, HADStaticPackedCache(config=model.config, max_cache_len=24))
    torch._dynamo.reset()
    counter = _SharedCounter("aot_eager")
    compiled = _greedy(
        model,
        inputs,
        HADStaticPackedCache(config=model.config, max_cache_len=24),
        compile_config=_compile_config(counter),
    )
    assert counter.frame_count == 1  # one graph served the 7 decode steps (the prefill runs eagerly)
    _assert_same_generation(compiled, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
def test_generate_with_cuda_graphs_gives_the_eager_tokens(rule):
    """On CUDA: generate() compiles the decode step with inductor and CUDA graphs (`mode="reduce-overhead"`, its
    default for a compileable cache); the op runs its Triton kernels. Same tokens as the eager HAD path."""
    model = _model(rule, seed=3).cuda()
    inputs = {name: tensor.cuda() for name, tensor in model_inputs("llama", batch=3, length=9).items()}
    expected = _greedy(model, inputs, HADPackedCache(config=model.config))
    torch._dynamo.reset()
    compile_config = tf.CompileConfig(fullgraph=True, backend="inductor", mode="reduce-overhead")
    for _ in range(2):  # the second call replays the recorded graphs
        cache = HADStaticPackedCache(config=model.config, max_cache_len=24)
        output = _greedy(model, inputs, cache, compile_config=compile_config)
        assert torch.equal(output.sequences, expected.sequences)
        for scores, expected_scores in zip(output.scores, expected.scores, strict=True):
            torch.testing.assert_close(scores, expected_scores, atol=1e-4, rtol=1e-4)
