"""`HADPackedCache`: keys stored as packed sign bits, and generate() with it matching the float-key cache."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import VOCAB, model_inputs
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import had_hf
from had_hf import HADConfig
from had_hf.cache import HADPackedCache, HADPackedLayer
from had_hf.kernels import pack_sign_bits, unpack_sign_bits


def _fill(layer: HADPackedLayer, steps: list[int], batch: int = 2, heads: int = 3, dim: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys, values = [], []
    for tokens in steps:
        key = torch.randn(batch, heads, tokens, dim, generator=generator)
        value = torch.randn(batch, heads, tokens, dim, generator=generator).to(torch.bfloat16)
        packed, cached_values = layer.update(key, value)
        keys.append(key)
        values.append(value)
    return torch.cat(keys, dim=2), torch.cat(values, dim=2), packed, cached_values


def test_update_returns_packed_keys_and_values():
    layer = HADPackedLayer(block_size=16)
    keys, values, packed, cached_values = _fill(layer, [37, 1, 1, 20])
    assert packed.dtype == torch.int32 and packed.shape == (2, 3, 59, 2)
    assert torch.equal(packed, pack_sign_bits(keys))
    assert torch.equal(unpack_sign_bits(packed), torch.where(keys >= 0, 1.0, -1.0))
    assert cached_values.dtype == torch.bfloat16 and torch.equal(cached_values, values)
    assert layer.get_seq_length() == 59
    assert layer.get_mask_sizes(1) == (60, 0)


def test_buffers_grow_geometrically_and_decode_steps_do_not_copy():
    layer = HADPackedLayer(block_size=16, growth=1.5)
    _fill(layer, [40])
    capacity = layer._key_buffer.shape[2]
    storage = layer._value_buffer.data_ptr()
    assert capacity == 48
    _fill(layer, [1] * (capacity - 40), seed=1)
    assert layer._value_buffer.data_ptr() == storage  # appends wrote in place: no per-step copy of the cache
    _fill(layer, [1], seed=2)
    assert layer._key_buffer.shape[2] == 80 and layer.get_seq_length() == capacity + 1


def test_key_memory_is_one_sixteenth_of_bf16():
    layer = HADPackedLayer()
    keys, _, _, _ = _fill(layer, [300], dim=128)
    assert layer.key_memory_bytes() == keys.numel() // 8  # d/8 bytes per key and head
    assert layer.key_memory_bytes() * 16 == keys.to(torch.bfloat16).numel() * 2


def test_crop_reorder_and_batch_ops():
    layer = HADPackedLayer(block_size=8)
    keys, values, _, _ = _fill(layer, [12, 1, 1])
    layer.crop(-4)
    assert layer.get_seq_length() == 10 and torch.equal(layer.keys, pack_sign_bits(keys[:, :, :10]))
    layer.crop(6)  # legacy: the length to keep
    assert layer.get_seq_length() == 6 and torch.equal(layer.values, values[:, :, :6])
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys, pack_sign_bits(keys[[1, 0], :, :6]))
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 4 and torch.equal(layer.values[2], values[0, :, :6])
    layer.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(layer.values, values[[1, 0], :, :6])
    key, value = torch.randn(2, 3, 1, 64), torch.randn(2, 3, 1, 64)
    packed, _ = layer.update(key, value)
    assert packed.shape[2] == 7 and torch.equal(packed[:, :, -1:], pack_sign_bits(key))
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_initialized


def test_cache_from_config_and_lazy_layers():
    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1)
    cache = HADPackedCache(config=config)
    assert len(cache.layers) == 3 and all(isinstance(layer, HADPackedLayer) for layer in cache.layers)
    assert not cache.is_compileable and cache.get_seq_length() == 0
    lazy = HADPackedCache(block_size=32)
    lazy.update(torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32), layer_idx=1)
    assert len(lazy.layers) == 2 and lazy.layers[1].block_size == 32 and lazy.get_seq_length(1) == 5
    assert lazy.key_memory_bytes() == 1 * 2 * 5 * 4
    sliding = LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="sliding_attention"):
        HADPackedCache(config=sliding)


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x names the cache argument `cache`; earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.mark.parametrize("sink_keys", [0, 1])
def test_generate_with_packed_cache_matches_float_keys(sink_keys):
    """Greedy generation with packed keys equals the float keys', with and without attention sinks; the sinks change
    the scores (the decode path applies them)."""
    torch.manual_seed(0)
    # head_dim 32 (packing needs multiples of 32), two query heads sharing one key/value head
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    had_hf.convert(model, HADConfig(top_n=5, sink_keys=sink_keys))
    inputs = model_inputs("llama", batch=3, length=9)
    outputs = {}
    caches = [("float", DynamicCache()), ("packed", HADPackedCache(config=model.config))]
    if sink_keys:
        caches.append(("no_sinks", DynamicCache()))
    for name, cache in caches:
        model.config.quantization_config.sink_keys = 0 if name == "no_sinks" else sink_keys
        with torch.no_grad():
            outputs[name] = model.generate(
                **inputs,
                **{_cache_kwarg(model): cache},
                max_new_tokens=8,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        if name == "packed":
            assert cache.layers[0].keys.dtype == torch.int32
            assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 7
    assert torch.equal(outputs["float"].sequences, outputs["packed"].sequences)
    for float_scores, packed_scores in zip(outputs["float"].scores, outputs["packed"].scores):
        assert torch.allclose(float_scores, packed_scores, atol=1e-5, rtol=1e-5)
    if sink_keys:
        assert not torch.allclose(outputs["float"].scores[-1], outputs["no_sinks"].scores[-1], atol=1e-3)
