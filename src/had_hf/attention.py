"""The `hamming_topk` attention function: a readable PyTorch reference of METHOD.md sections 1-2.

transformers calls `fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)` with
query (B, Hq, q, d), key/value (B, Hkv, k, d) and expects `(output (B, q, Hq, d), weights)`. The same function
serves the four training stages and inference; on CUDA in inference it hands the binary stage to the Triton
kernels (`had_hf.kernels`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .binarize import transform
from .capture import STORE_KWARG, HADCaptureStore
from .config import HADConfig

logger = logging.getLogger(__name__)

ATTENTION_NAME = "hamming_topk"
DENSE_CAPTURE_NAME = "had_eager"

_DEFAULT_CONFIG = HADConfig()
_warned: set[str] = set()

# Incremented on every call; `had_hf.convert` checks after the first forward that the model really called us
# (a model may accept the attention name and never use the interface, e.g. DeBERTa-v2).
call_count = 0


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def resolve_config(module: torch.nn.Module) -> HADConfig:
    """The HADConfig of an attention module: attached by `convert`/loading, else the model config's, else defaults."""
    config = getattr(module, "_had_config", None)
    if config is None:
        config = getattr(getattr(module, "config", None), "quantization_config", None)
        if isinstance(config, dict) and config.get("quant_method") == "had":
            # a saved config read without the quantizer (AutoConfig.from_pretrained, then from_config): the dict
            config = HADConfig.from_dict(config)
            module._had_config = config
    if isinstance(config, HADConfig):
        return config
    _warn_once(
        "no-config",
        "hamming_topk attention runs without a HADConfig (defaults: top_n=30, stage='binary', sigma=1). "
        "Use `had_hf.convert(model, HADConfig(...))` or load with `quantization_config=HADConfig(...)`.",
    )
    return _DEFAULT_CONFIG


def repeat_kv(states: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    """Expands (B, Hkv, k, d) to (B, Hq, k, d) for grouped-query attention."""
    num_kv_heads = states.shape[1]
    if num_kv_heads == num_query_heads:
        return states
    if num_query_heads % num_kv_heads:
        raise ValueError(f"{num_query_heads} query heads cannot share {num_kv_heads} key/value heads evenly.")
    return states.repeat_interleave(num_query_heads // num_kv_heads, dim=1)


def valid_keys_and_bias(
    attention_mask: torch.Tensor | None, query_len: int, key_len: int, is_causal: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turns any transformers mask into (valid: bool broadcastable to (B, H, q, k), additive bias or None).

    Boolean masks (True = attend) come from had_hf's mask function; float masks (0 / large negative, possibly with
    a bias such as ALiBi) from models that build their own.
    """
    if attention_mask is None:
        valid = torch.ones(1, 1, query_len, key_len, dtype=torch.bool, device=device)
        if is_causal and query_len > 1:
            # queries are the last `query_len` positions of the keys (prefill after a cache, or plain causal)
            offset = key_len - query_len
            rows = torch.arange(query_len, device=device)[:, None] + offset
            valid = valid & (torch.arange(key_len, device=device)[None, :] <= rows)
        return valid, None
    attention_mask = attention_mask[..., :key_len]
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    valid = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    bias = torch.where(valid, attention_mask, torch.zeros((), dtype=attention_mask.dtype, device=device))
    return valid, (bias if bool(bias.ne(0).any()) else None)


def select_top_n(scores: torch.Tensor, valid: torch.Tensor, top_n: int) -> torch.Tensor:
    """The keys each query keeps: exactly `min(top_n, valid keys)`, lower key index first among ties.

    The N-th largest valid score is a threshold t: every key above t is kept, and of the keys equal to t the first
    ones in index order fill the rest. This is the same rule as the GPU kernels' histogram and the ONNX graph's
    TopK + cumsum, so every implementation selects the same set.

    Args:
        scores (`torch.Tensor`): (..., k) logits (any real values).
        valid (`torch.Tensor`): bool, broadcastable to `scores`; False keys are never kept.
        top_n (`int`): N.

    Returns:
        `torch.Tensor`: bool mask of the kept keys, shaped like `scores`.
    """
    valid = valid.expand_as(scores)
    k = min(top_n, scores.shape[-1])
    masked = scores.masked_fill(~valid, float("-inf"))
    threshold = masked.topk(k, dim=-1).values[..., k - 1 : k]
    above = (masked > threshold) & valid
    tied = (masked == threshold) & valid
    quota = k - above.sum(dim=-1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=-1) <= quota))


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the kept entries only; a row that keeps nothing gives zeros (never NaN, also in backward)."""
    filled = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=-1) * keep.to(logits.dtype)


def _store_from(kwargs: dict) -> HADCaptureStore | None:
    return kwargs.get(STORE_KWARG)


def _prologue(module, query, key, attention_mask, scaling, kwargs):
    """What both attention functions start with: count the call, default scale, normalized mask."""
    global call_count
    call_count += 1
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    is_causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    valid, mask_bias = valid_keys_and_bias(attention_mask, query.shape[-2], key.shape[-2], is_causal, query.device)
    return scaling, valid, mask_bias


def hamming_topk_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HAD attention: stage transform of Q and K, logits, top-N, softmax over the kept keys, sparse A.V."""
    scaling, valid, mask_bias = _prologue(module, query, key, attention_mask, scaling, kwargs)
    config = resolve_config(module)
    name = getattr(module, "_had_name", None)
    store = _store_from(kwargs)
    key_len = key.shape[-2]
    is_cross = bool(getattr(module, "_had_is_cross", False))

    if not config.binarizes(is_cross):
        return _dense_attention(
            module, name, store, query, key, value, valid, mask_bias, scaling, dropout, position_bias
        )

    sigma_q, sigma_k = config.sigmas(name)
    top_n = config.num_kept(key_len)
    per_head = isinstance(sigma_q, tuple) or isinstance(sigma_k, tuple)

    packed_keys = key.dtype in (torch.int32, torch.int64)
    if packed_keys and per_head:
        raise ValueError(
            f"Layer {name!r} has one sigma per head, which the packed-key decode path does not take (its softmax "
            "temperature is one number per layer). Use a per-layer calibration (HADConfig(sigma_per_head=False)) "
            "or a cache that keeps floating keys."
        )
    if packed_keys or (not per_head and _can_use_kernel(module, config, store, position_bias, mask_bias, query)):
        return _kernel_attention(query, key, value, valid, top_n, sigma_q * sigma_k * scaling, config)

    if store is not None:
        store.record_qk(name, query, key)
    if per_head:
        sigma_q = _head_sigma(sigma_q, query.shape[1], name, "sigma_q", query)
        sigma_k = repeat_kv(_head_sigma(sigma_k, key.shape[1], name, "sigma_k", query), query.shape[1])
    key = repeat_kv(key, query.shape[1])
    value = repeat_kv(value, query.shape[1])
    if config.stage in ("ste", "binary"):
        # ±1 factors keep the Hamming scores exact integers (ties stay ties); alpha is applied afterwards
        unit_q = transform(query, sigma_q, config.stage, config.c, config.ste_clip) / sigma_q
        unit_k = transform(key, sigma_k, config.stage, config.c, config.ste_clip) / sigma_k
        logits = torch.matmul(unit_q, unit_k.transpose(-1, -2)) * (sigma_q * sigma_k * scaling)
    else:
        query_t = transform(query, sigma_q, config.stage, config.c, config.ste_clip)
        key_t = transform(key, sigma_k, config.stage, config.c, config.ste_clip)
        logits = torch.matmul(query_t, key_t.transpose(-1, -2)) * scaling
    logits = _add_biases(logits, position_bias, mask_bias)

    if store is not None:
        store.record_logits(name, logits, valid)
    keep = select_top_n(logits, valid, top_n)
    weights = masked_softmax(logits, keep)
    weights_dropped = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights_dropped.to(value.dtype), value)
    if store is not None and store.capture_details:
        store.record_details(
            name,
            query_sign=(query >= 0).to(torch.int8) * 2 - 1,
            key_sign=(key >= 0).to(torch.int8) * 2 - 1,
            keep=keep,
            weights=weights,
            output=output,
            alpha=torch.as_tensor(sigma_q * sigma_k * scaling),
        )
    return output.transpose(1, 2).contiguous(), weights


def _head_sigma(sigma, num_heads: int, name, which: str, like: torch.Tensor) -> torch.Tensor:
    """A layer's sigma as a (1, H, 1, 1) tensor: a per-head tuple of H values, or one number for every head."""
    values = sigma if isinstance(sigma, tuple) else (sigma,) * num_heads
    if len(values) != num_heads:
        heads = "query" if which == "sigma_q" else "key/value"
        raise ValueError(f"Layer {name!r} has {len(values)} per-head {which} values but {num_heads} {heads} heads.")
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, num_heads, 1, 1)


def _add_biases(logits: torch.Tensor, *biases: torch.Tensor | None) -> torch.Tensor:
    for bias in biases:
        if bias is not None:
            logits = logits + bias
    return logits


def _dense_attention(module, name, store, query, key, value, valid, mask_bias, scaling, dropout, position_bias):
    """Standard softmax attention (the teacher's, or a layer HAD leaves dense), recording what the loss needs."""
    if store is not None:
        store.record_qk(name, query, key)
    key = repeat_kv(key, query.shape[1])
    value = repeat_kv(value, query.shape[1])
    logits = _add_biases(torch.matmul(query, key.transpose(-1, -2)) * scaling, position_bias, mask_bias)
    if store is not None:
        store.record_logits(name, logits, valid)
    weights = masked_softmax(logits, valid.expand_as(logits))
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights.to(value.dtype), value)
    return output.transpose(1, 2).contiguous(), weights


def _can_use_kernel(module, config, store, position_bias, mask_bias, query) -> bool:
    """The Triton kernels serve inference of the binary stage without biases; everything else is the reference."""
    if not query.is_cuda or module.training or torch.is_grad_enabled() or store is not None:
        return False
    if config.stage != "binary" or position_bias is not None or mask_bias is not None:
        return False
    from .kernels import is_triton_available

    return is_triton_available()


def _kernel_attention(query, key, value, valid, top_n, alpha, config):
    if config.stage not in ("binary", "ste"):
        raise ValueError(f"Packed binary keys need stage 'binary', but this model's HADConfig has {config.stage!r}.")
    from .kernels import hamming_topk_attention

    output = hamming_topk_attention(query, key, value, valid, top_n, alpha)
    return output.transpose(1, 2).contiguous(), None


def dense_capture_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager softmax attention that fills a `HADCaptureStore`: the teacher's side of the distillation loss, and
    the dense pass of calibration. Numerically the same as transformers' eager attention."""
    scaling, valid, mask_bias = _prologue(module, query, key, attention_mask, scaling, kwargs)
    name = getattr(module, "_had_name", None)
    return _dense_attention(
        module, name, _store_from(kwargs), query, key, value, valid, mask_bias, scaling, dropout, position_bias
    )


def boolean_mask_function(*args, **kwargs):
    """Mask interface entry for had_hf's attention names: always a materialized boolean mask (True = attend).

    Without an entry transformers passes `attention_mask=None` to a custom attention name (padding silently
    ignored); and the causal/bidirectional skips of the sdpa mask would leave causality to an `is_causal` flag that
    a top-N selection cannot use.
    """
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)
