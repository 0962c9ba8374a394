"""A transformers `Cache` that stores keys as packed sign bits: d/8 bytes per key and head instead of 2d.

HAD attention at inference needs only the signs of the keys (METHOD.md section 1), so `HADPackedCache` keeps the key
states as int32 words (bit i of word w = dimension 32*w + i, set for x >= 0) and the values in the model dtype. Its
`update` returns `(packed int32 keys, values)`; the `hamming_topk` attention function recognizes the integer keys and
runs the packed path (`had_hf.kernels.hamming_topk_attention`). Any other attention function would read the int32
words as numbers, so use this cache only with `attn_implementation="hamming_topk"` in the binary stage.

Example:

```python
>>> from had_hf.cache import HADPackedCache
>>> cache = HADPackedCache(config=model.config)
>>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
```

Unlike `DynamicLayer`, which concatenates (copies) the whole cache at every step, a `HADPackedLayer` writes into
buffers that grow geometrically, and returns views of their filled part: a decode step then costs the attention's
reads, not a copy of every cached value.

`HADStaticPackedCache` is the compilable twin (a `StaticCache`): packed-key and value buffers of `max_cache_len`
tokens allocated once, written in place, the length a device tensor; `torch.compile` of the decode step (CUDA graphs
included) then sees fixed shapes and addresses. transformers >= 5.x has no registry of `cache_implementation` names
(its static names map to `StaticCache` in `generate`), so it is passed as a cache object:

```python
>>> from had_hf.cache import HADStaticPackedCache
>>> cache = HADStaticPackedCache(config=model.config, max_cache_len=prompt_len + 64)
>>> model.generate(**inputs, cache=cache, max_new_tokens=64)  # `past_key_values=` before transformers 5.2x
```
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticCache, StaticLayer

from .kernels import pack_signs
from .kernels.int32_words import WORD_BITS, pack_sign_bits

__all__ = ["HADPackedCache", "HADPackedLayer", "HADStaticPackedCache", "HADStaticPackedLayer"]


class HADPackedLayer(DynamicLayer):
    """
    One layer of `HADPackedCache`: keys as packed sign bits of shape `[batch_size, num_heads, seq_len, head_dim // 32]`
    (int32), values as `[batch_size, num_heads, seq_len, head_dim]` in the model dtype.

    `keys` and `values` are views of the filled part of growing buffers, so they are strided along the sequence.

    Args:
        growth (`float`, *optional*, defaults to 1.25):
            Factor by which a full buffer grows; the capacity is rounded up to a multiple of `block_size`.
        block_size (`int`, *optional*, defaults to 256):
            Granularity, in tokens, of the buffers' capacity.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False

    def __init__(self, growth: float = 1.25, block_size: int = 256, **kwargs):
        super().__init__(**kwargs)
        if growth <= 1.0 or block_size < 1:
            raise ValueError(f"HADPackedLayer needs growth > 1 and block_size >= 1, got {growth} and {block_size}.")
        self.growth = growth
        self.block_size = block_size
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] % WORD_BITS:
            raise ValueError(f"HADPackedCache packs head dims that are multiples of 32, got {key_states.shape[-1]}.")
        self.dtype, self.device = value_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        batch, num_heads = key_states.shape[:2]
        self._key_buffer = torch.empty(
            batch, num_heads, 0, self.head_dim // WORD_BITS, dtype=torch.int32, device=self.device
        )
        self._value_buffer = torch.empty(
            batch, value_states.shape[1], 0, value_states.shape[-1], dtype=self.dtype, device=self.device
        )
        self._length = 0
        self._refresh_views()
        self.is_initialized = True

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[:, :, : self._length]
        self.values = self._value_buffer[:, :, : self._length]

    def _reserve(self, length: int) -> None:
        capacity = self._key_buffer.shape[2]
        if length <= capacity:
            return
        wanted = max(length, int(capacity * self.growth))
        capacity = -(-wanted // self.block_size) * self.block_size
        key_buffer = self._key_buffer.new_empty(*self._key_buffer.shape[:2], capacity, self._key_buffer.shape[-1])
        value_buffer = self._value_buffer.new_empty(
            *self._value_buffer.shape[:2], capacity, self._value_buffer.shape[-1]
        )
        key_buffer[:, :, : self._length] = self._key_buffer[:, :, : self._length]
        value_buffer[:, :, : self._length] = self._value_buffer[:, :, : self._length]
        self._key_buffer, self._value_buffer = key_buffer, value_buffer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Packs the signs of the new key states, appends them and the new value states, and returns the whole cache.

        Args:
            key_states (`torch.Tensor`): The new key states, `[batch_size, num_heads, new_tokens, head_dim]`.
            value_states (`torch.Tensor`): The new value states, `[batch_size, num_heads, new_tokens, head_dim]`.

        Returns:
            tuple[`torch.Tensor`, `torch.Tensor`]: The packed int32 keys `[..., seq_len, head_dim // 32]` and the
            values `[..., seq_len, head_dim]` of every cached token.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_tokens = key_states.shape[-2]
        end = self._length + new_tokens
        self._reserve(end)
        self._key_buffer[:, :, self._length : end] = pack_signs(key_states)
        self._value_buffer[:, :, self._length : end] = value_states.to(self.dtype)
        self._length = end
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Returns the sequence length of the cached states."""
        return self._length if self.is_initialized else 0

    def key_memory_bytes(self) -> int:
        """Bytes of the cached keys (filled part): d/8 per token and head."""
        return self.keys.numel() * self.keys.element_size() if self.is_initialized else 0

    def reset(self) -> None:
        """Drops the cached states; the next `update` starts afresh."""
        self._key_buffer = self._value_buffer = None
        self.keys = self.values = None
        self._length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """
        Removes the last `-tokens_to_remove` tokens (a negative count). A positive value is the length to keep, as
        the legacy API of transformers < 5.18 had it.
        """
        if not self.is_initialized or tokens_to_remove == 0:
            return
        if tokens_to_remove > 0:
            self._length = min(self._length, tokens_to_remove)
        else:
            self._length = max(0, self._length + tokens_to_remove)
        self._refresh_views()

    def _map_batch(self, function) -> None:
        if not self.is_initialized:
            return
        self._key_buffer = function(self._key_buffer)
        self._value_buffer = function(self._value_buffer)
        self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat the cache `repeats` times in the batch dimension."""
        self._map_batch(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Only keep the `indices` in the batch dimension of the cache."""
        self._map_batch(lambda buffer: buffer[indices.to(buffer.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorders this layer's cache for beam search."""
        self._map_batch(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def offload(self) -> None:
        """Offload this layer's data to CPU device."""
        self._map_batch(lambda buffer: buffer.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        """Move the offloaded data back to the layer's device ahead of time."""
        if self.is_initialized and self._key_buffer.device != self.device:
            self._map_batch(lambda buffer: buffer.to(self.device, non_blocking=True))


def _num_full_attention_layers(config, cache_name: str) -> int:
    """The decoder's number of layers, refusing models with sliding-window layers (a packed cache keeps no window)."""
    decoder_config = config.get_text_config(decoder=True)
    layer_types = getattr(decoder_config, "layer_types", None)
    if layer_types is not None:
        unsupported = sorted(set(layer_types) - {"full_attention"})
    else:
        unsupported = ["sliding_attention"] if getattr(decoder_config, "sliding_window", None) else []
    if unsupported:
        raise ValueError(f"{cache_name} needs full-attention layers only; this model also has {unsupported}.")
    return decoder_config.num_hidden_layers


class HADPackedCache(Cache):
    """
    A cache for `generate()` with HAD attention (`attn_implementation="hamming_topk"`, binary stage): keys stored as
    packed sign bits, `1/16` of the memory of bf16 keys, values in the model dtype. See `HADPackedLayer`.

    Args:
        config (`PreTrainedConfig`, *optional*):
            The model's config. If given, one layer per decoder layer is created up front; every layer must be full
            attention (sliding-window layers keep a window, which this cache does not implement). Without it, layers
            are added as `update` reaches them.
        offloading (`bool`, *optional*, defaults to `False`):
            Whether to offload the layers to the CPU between uses, as transformers' `DynamicCache` can.
        **layer_kwargs:
            Passed to every `HADPackedLayer` (`growth`, `block_size`).
    """

    def __init__(self, config=None, offloading: bool = False, **layer_kwargs):
        new_layer = functools.partial(HADPackedLayer, **layer_kwargs)
        if config is None:
            super().__init__(layer_class_to_replicate=new_layer, offloading=offloading)
            return
        num_layers = _num_full_attention_layers(config, type(self).__name__)
        super().__init__(layers=[new_layer() for _ in range(num_layers)], offloading=offloading)

    def key_memory_bytes(self) -> int:
        """Bytes of all cached keys (filled parts of the buffers)."""
        return sum(layer.key_memory_bytes() for layer in self.layers)


class HADStaticPackedLayer(StaticLayer):
    """
    One layer of `HADStaticPackedCache`: a `StaticLayer` whose keys are packed sign bits, preallocated as
    `[batch_size, num_heads, max_cache_len, head_dim // 32]` int32, values as `[..., max_cache_len, head_dim]`.

    `update` writes the new tokens in place after the `cumulative_length` already cached (a device tensor, so a
    compiled step has no Python int that changes) and returns the whole buffers; the slots not yet written are masked
    by the attention mask (of length `max_cache_len`, as for `StaticLayer`), and the top-N rule counts only valid
    keys, so they never count.

    Args:
        max_cache_len (`int`):
            Maximum number of tokens that can be stored, used for preallocation.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[-1] % WORD_BITS:
            raise ValueError(
                f"HADStaticPackedCache packs head dims that are multiples of 32, got {key_states.shape[-1]}."
            )
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        self.keys = torch.zeros(
            self.batch_size, self.num_heads, self.max_cache_len, self.k_head_dim // WORD_BITS,
            dtype=torch.int32, device=self.device,
        )  # fmt: skip
        self.values = torch.zeros(
            self.batch_size, value_states.shape[1], self.max_cache_len, self.v_head_dim,
            dtype=value_states.dtype, device=self.device,
        )  # fmt: skip
        self.cumulative_length = self.cumulative_length.to(self.device)
        # fixed addresses let a compiled step mutate the buffers without a recompile or a CUDA-graph skip (as
        # StaticLayer; not allowed while tracing, i.e. when the prefill itself is compiled)
        if not torch.compiler.is_compiling():
            for tensor in (self.keys, self.values, self.cumulative_length):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Packs the signs of the new key states and writes them and the new value states in place.

        Args:
            key_states (`torch.Tensor`): The new key states, `[batch_size, num_heads, new_tokens, head_dim]`.
            value_states (`torch.Tensor`): The new value states, `[batch_size, num_heads, new_tokens, head_dim]`.

        Returns:
            tuple[`torch.Tensor`, `torch.Tensor`]: The packed int32 keys `[..., max_cache_len, head_dim // 32]` and the
            values `[..., max_cache_len, head_dim]`, filled up to the cached length.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # traced code packs in PyTorch (inductor fuses it with the projection); eager code may use the Triton packer
        words = pack_sign_bits(key_states) if torch.compiler.is_compiling() else pack_signs(key_states)
        new_tokens = key_states.shape[-2]
        positions = torch.arange(new_tokens, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(new_tokens)
        self.keys.index_copy_(2, positions, words)
        self.values.index_copy_(2, positions, value_states.to(self.values.dtype))
        return self.keys, self.values

    def key_memory_bytes(self) -> int:
        """Bytes of the key buffer (all `max_cache_len` slots): d/8 per token and head."""
        return self.keys.numel() * self.keys.element_size() if self.is_initialized else 0


class HADStaticPackedCache(StaticCache):
    """
    A compilable cache for HAD attention (`attn_implementation="hamming_topk"`, binary stage): keys stored as packed
    sign bits in preallocated buffers, values in the model dtype; see `HADStaticPackedLayer`. `is_compileable` is
    True, so `generate()` compiles its decode step as it does for `StaticCache` (on CUDA by default; elsewhere with
    `compile_config=CompileConfig(...)` whose `_compile_all_devices` is set).

    Args:
        config (`PreTrainedConfig`):
            The model's config: one layer per decoder layer, all full attention.
        max_cache_len (`int`):
            The most tokens (prompt and generated) the cache holds.
        offloading (`bool`, *optional*, defaults to `False`):
            Whether to offload the layers to the CPU between uses, as transformers' `StaticCache` can.
    """

    def __init__(self, config, max_cache_len: int, offloading: bool = False, **kwargs):
        num_layers = _num_full_attention_layers(config, type(self).__name__)
        layers = [HADStaticPackedLayer(max_cache_len=max_cache_len) for _ in range(num_layers)]
        Cache.__init__(self, layers=layers, offloading=offloading)

    def key_memory_bytes(self) -> int:
        """Bytes of all key buffers."""
        return sum(layer.key_memory_bytes() for layer in self.layers)
