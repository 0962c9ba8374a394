"""The end-to-end figure of `decode.py`: `generate()` decode tokens/s and peak memory of a random-weights Llama-style
model, sdpa against `hamming_topk` + HADPackedCache.

The prompt is prefilled once with sdpa and copied into every cache (DynamicCache, StaticCache, HADPackedCache), so
the figures time decode steps only; each variant also records the mean time of a one-token forward without
`generate()`'s bookkeeping.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import _cache_kwarg  # noqa: E402


def run_e2e(
    context: int, new_tokens: int, batch: int, device: torch.device, top_n_ratio: float, tiny: bool = False
) -> dict:
    """generate() decode tokens/s and peak memory: sdpa + DynamicCache (transformers' default), sdpa + StaticCache,
    and hamming_topk (keeping ceil(top_n_ratio * n) keys) + HADPackedCache."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

    import had_hf
    from had_hf.cache import HADPackedCache

    print(f"\n== end to end: batch {batch}, context {context}, {new_tokens} new tokens", flush=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512 if tiny else 32000,
        hidden_size=256 if tiny else 2048,
        intermediate_size=512 if tiny else 5632,
        num_hidden_layers=2 if tiny else 8,
        num_attention_heads=8 if tiny else 32,
        num_key_value_heads=2 if tiny else 8,
        max_position_embeddings=context + new_tokens + 16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    prompt = torch.randint(3, config.vocab_size, (batch, context), device=device)
    cache_kwarg = _cache_kwarg(model)
    on_cuda = device.type == "cuda"
    with torch.no_grad():
        prefill = DynamicCache()
        model(input_ids=prompt[:, :-1], use_cache=True, logits_to_keep=1, **{cache_kwarg: prefill})

    def packed_copy() -> HADPackedCache:
        cache = HADPackedCache(config=model.config)
        for layer_idx, layer in enumerate(prefill.layers):
            cache.update(layer.keys, layer.values, layer_idx)
        return cache

    def timed_generate(make_cache) -> dict:
        with torch.no_grad():
            model.generate(  # warm-up: kernel compilation (every specialization a step can hit), allocator
                input_ids=prompt, **{cache_kwarg: make_cache()}, max_new_tokens=20, do_sample=False, pad_token_id=0
            )
            cache = make_cache()
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            sequences = model.generate(
                input_ids=prompt,
                **{cache_kwarg: cache},
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            if on_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        cache_bytes = sum(
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in cache.layers
        )
        return {
            "tokens_per_s": batch * new_tokens / seconds,
            "ms_per_step": seconds / new_tokens * 1e3,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
            "cache_gib": cache_bytes / 2**30,
            "new_tokens": int(sequences.shape[1] - context),
        }

    def forward_ms(make_cache, steps: int = 8) -> float:
        """Mean time of a one-token forward (no generate() bookkeeping), synchronized."""
        cache, token = make_cache(), prompt[:, -1:]
        with torch.no_grad():
            # warm-up over 16 cache lengths: the kernels specialize on strides that follow the key count (e.g. a
            # mask's batch stride, divisible by 16 or not), and a compilation in the timed window would dominate it
            for _ in range(16):
                model(input_ids=token, logits_to_keep=1, **{cache_kwarg: cache})
            if on_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                model(input_ids=token, logits_to_keep=1, **{cache_kwarg: cache})
            if on_cuda:
                torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps * 1e3

    result = {"batch": batch, "context": context, "new_tokens": new_tokens}
    result["sdpa"] = timed_generate(lambda: copy.deepcopy(prefill))
    result["sdpa"]["forward_ms"] = forward_ms(lambda: copy.deepcopy(prefill))
    print(f"sdpa: {result['sdpa']}", flush=True)
    # the fairer dense baseline: a StaticCache writes each new token in place, where DynamicCache concatenates (a
    # copy of the whole cache per layer and step)
    with torch.no_grad():
        static_prefill = StaticCache(config=model.config, max_cache_len=context + max(new_tokens, 24) + 8)
        model(input_ids=prompt[:, :-1], use_cache=True, logits_to_keep=1, **{cache_kwarg: static_prefill})

    def static_copy() -> StaticCache:
        return copy.deepcopy(static_prefill)

    result["sdpa_static"] = timed_generate(static_copy)
    result["sdpa_static"]["forward_ms"] = forward_ms(static_copy)
    static_prefill = None  # free it before the HAD run
    print(f"sdpa + StaticCache: {result['sdpa_static']}", flush=True)
    had_hf.convert(model, had_hf.HADConfig(top_n_ratio=top_n_ratio))
    result["had"] = timed_generate(packed_copy)
    result["had"]["forward_ms"] = forward_ms(packed_copy)
    print(f"had:  {result['had']}", flush=True)
    had_hf.revert(model, "sdpa")
    return result
