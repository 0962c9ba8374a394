"""The HAD attention function (METHOD.md sections 1-2), which every attention mode of had_hf runs.

transformers calls `fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)` with
query (B, Hq, q, d) and key/value (B, Hkv, k, d) and expects `(output (B, q, Hq, d), weights)`. `had_attention`
serves every mode of `had_hf.modes` (HAD itself, the dense teacher, golden vectors, ONNX export, the dense top-N
reference): a mode only says which scores it computes and what it records.

For a HAD module in the `inference` stage the work is one call of the `had::hamming_topk_attention` op (Triton
kernels on CUDA); the training stages, and anything that needs gradients or records the logits, run the
differentiable PyTorch code below with the same selection rule (`had_hf.selection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops
from .binarize import sign, transform
from .capture import RECORD_ATTRIBUTE, STORE_KWARG, DenseScores, LayerRecord
from .config import HADConfig
from .losses import chunked_attention_kl_terms
from .selection import causal_valid, kept_indices, select_top_n
from .state import INFERENCE, STATE_ATTRIBUTE, HADRuntimeState, stage_transform

_INFERENCE_STATE = HADRuntimeState()


class UnsetModuleError(RuntimeError):
    """A module called HAD attention without the per-layer settings that `had_hf.convert` attaches."""


@dataclass
class _CallProbe:
    """Counts eager attention calls while `active` (during `convert`'s first-forward check). Compiled attention reads
    neither field; it sets `compiled_call` (see `integration._verify_on_first_forward`)."""

    active: bool = False
    calls: int = 0
    compiled_call: bool = False


CALL_PROBE = _CallProbe()


@dataclass(frozen=True)
class LayerSettings:
    """What the attention function needs to know about the module calling it."""

    name: str | None
    binarized: bool
    config: HADConfig
    state: HADRuntimeState
    aliases: tuple[str, ...] = ()
    record: LayerRecord | None = None  # the record a capture store bound to the module (`HADCaptureStore.bound`)

    @property
    def sigmas(self):
        """(sigma_q, sigma_k): numbers (per-head tuples) from the config; inside `torch.compile`, the bound record's
        tensors where it has them, so that a graph holds no layer's values (and a new calibration recompiles
        nothing)."""
        if self.record is not None and self.record.sigmas is not None and torch.compiler.is_compiling():
            return self.record.sigmas
        return self.config.sigmas(self.name, self.aliases)


def layer_settings(module: torch.nn.Module) -> LayerSettings:
    """The settings `had_hf.integration.attach` put on an attention module.

    A module without them is either one that the target table leaves dense (tagged `_had_dense`), or one of a model
    built without had_hf's loading hook (`AutoModel.from_config` of a HAD config): the latter runs with the config's
    uniform settings, and is refused when the config holds per-layer settings that it could not apply.
    """
    config = getattr(module, "_had_config", None)
    state = getattr(module, STATE_ATTRIBUTE, None) or _INFERENCE_STATE
    if config is not None:
        binarized = config.binarizes(module._had_is_cross)
        record = getattr(module, RECORD_ATTRIBUTE, None)
        if record is not None and torch.compiler.is_compiling():
            # compiled code reads no name: every decoder block can share one graph (regional compilation)
            return LayerSettings(None, binarized, config, state, record=record)
        return LayerSettings(module._had_name, binarized, config, state, getattr(module, "_had_aliases", ()), record)
    if getattr(module, "_had_dense", False):
        return LayerSettings(None, False, HADConfig(), state)
    config = getattr(getattr(module, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == "had":
        config = HADConfig.from_dict(config)
    if not isinstance(config, HADConfig):
        config = HADConfig()
    if config.sigma_q or config.sigma_k or config.target_modules or not config.binarize_cross_attention:
        raise UnsetModuleError(
            f"{type(module).__name__} runs HAD attention without had_hf's per-layer settings (calibrated sigmas, "
            "target modules, cross-attention choice), so they would be ignored. This happens with "
            "`AutoModel.from_config` of a HAD config: call `had_hf.convert(model)` after it (it applies the HADConfig "
            "in model.config), or load with `from_pretrained`."
        )
    return LayerSettings(None, config.binarize_self_attention, config, state)


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
    a bias such as ALiBi) from models that build their own: their finite part is kept as a bias.
    """
    if attention_mask is None:
        if is_causal and query_len > 1:
            return causal_valid(query_len, key_len, device), None
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device), None
    attention_mask = attention_mask[..., :key_len]
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    valid = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return valid, torch.where(valid, attention_mask, torch.zeros((), dtype=attention_mask.dtype, device=device))


def masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the kept entries only; a row that keeps nothing gives zeros (never NaN, also in backward)."""
    dropped = ~keep  # `keep` may broadcast (a mask shared by heads or the batch): inverted once at its own size
    filled = logits.masked_fill(dropped, torch.finfo(logits.dtype).min)
    return torch.softmax(filled, dim=-1).masked_fill(dropped, 0.0)


def gathered_values(weights: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, slots: int) -> torch.Tensor:
    """A.V reading only the kept rows of V (as the hardware does): `slots` weights and value rows per query."""
    indices, present = kept_indices(keep, slots)  # (B, H, q, slots)
    kept_weights = weights.gather(-1, indices) * present.to(weights.dtype)
    batch_heads, head_dim = indices.shape[:2], value.shape[-1]
    flat = indices.flatten(2).unsqueeze(-1).expand(*batch_heads, -1, head_dim)  # (B, H, q*slots, d)
    rows = value.gather(2, flat).view(*indices.shape, head_dim)  # (B, H, q, slots, d)
    return (kept_weights.unsqueeze(-1).to(value.dtype) * rows).sum(dim=-2)


def _add_biases(logits: torch.Tensor, *biases: torch.Tensor | None) -> torch.Tensor:
    for bias in biases:
        if bias is not None:
            logits = logits + bias
    return logits


def _head_sigma(sigma, num_heads: int, name, which: str, like: torch.Tensor) -> torch.Tensor:
    """A layer's sigma as a (1, H, 1, 1) tensor: a per-head tuple of H values, or one number for every head."""
    values = sigma if isinstance(sigma, tuple) else (sigma,) * num_heads
    if len(values) != num_heads:
        heads = "query" if which == "sigma_q" else "key/value"
        raise ValueError(f"Layer {name!r} has {len(values)} per-head {which} values but {num_heads} {heads} heads.")
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, num_heads, 1, 1)


def _head_sigma_tensor(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d sigma as it is; one value per head as (1, H, 1, 1) in the dtype of `like` (as `_head_sigma` makes it)."""
    return sigma if sigma.dim() == 0 else sigma.to(like.dtype).view(1, -1, 1, 1)


def had_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    *,
    mode,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HAD attention in `mode` (an `had_hf.modes.AttentionMode`): logits, top-N, softmax over the kept keys, A.V."""
    if torch.compiler.is_compiling():
        CALL_PROBE.compiled_call = True
    elif CALL_PROBE.active:
        CALL_PROBE.calls += 1
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    settings = layer_settings(module)
    store = kwargs.get(STORE_KWARG)
    is_causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    packed_keys = not key.is_floating_point()
    had_scores = mode.scores != "dense" and settings.binarized
    stage = settings.state.stage if mode.scores == "had" else INFERENCE

    if packed_keys and not (had_scores and stage == INFERENCE):
        raise ValueError(
            f"Packed binary keys (HADPackedCache) need HAD attention in the inference stage, but layer "
            f"{settings.name!r} runs {'a training stage ' + repr(stage) if had_scores else 'dense attention'}."
        )
    if had_scores and stage == INFERENCE and _runs_op(mode, store, module, query, value, dropout):
        sigma_q, sigma_k = settings.sigmas
        if isinstance(sigma_q, tuple) or isinstance(sigma_k, tuple):
            if packed_keys:
                raise ValueError(
                    f"Layer {settings.name!r} has one sigma per head, which the packed-key path does not take (its "
                    "softmax temperature is one number per layer). Use a per-layer calibration "
                    "(HADConfig(sigma_per_head=False)) or a cache that keeps floating keys."
                )
        else:
            return _op_attention(query, key, value, attention_mask, position_bias, is_causal, settings, scaling)

    valid, mask_bias = valid_keys_and_bias(attention_mask, query.shape[-2], key.shape[-2], is_causal, query.device)
    if store is not None:
        store.record_qk(settings.name, query, key)
    num_kv_heads = key.shape[1]
    if store is not None and store.capture_scores:
        if had_scores:
            raise ValueError(
                f"capture_scores records dense logits' inputs, but layer {settings.name!r} runs HAD scores: the "
                "teacher's store needs a dense teacher (attn_implementation 'had_eager')."
            )
        _layer_record(store, settings).scores = DenseScores(query.detach(), key.detach(), scaling, position_bias)
    key = repeat_kv(key, query.shape[1])
    value = repeat_kv(value, query.shape[1])
    query_len = query.shape[-2]

    def scores(query_rows: torch.Tensor, rows: slice = slice(None)):
        biases = (_query_rows(position_bias, rows, query_len), _query_rows(mask_bias, rows, query_len))
        if had_scores:
            logits, *binary = _had_logits(query_rows, key, num_kv_heads, settings, stage, scaling)
        else:
            logits, binary = torch.matmul(query_rows, key.transpose(-1, -2)) * scaling, (None, None, None)
        return _add_biases(logits, *biases), *binary

    logits, unit_q, unit_k, alpha = scores(query)
    if store is not None:
        store.record_logits(settings.name, logits, valid)
        if store.distill_from is not None:
            _record_attention_kl(store, _layer_record(store, settings), query, key, valid, mask_bias, scores)

    sparse = mode.top_n and settings.binarized
    keep = select_top_n(logits, valid, **settings.config.num_kept_args) if sparse else valid
    weights = masked_softmax(logits, keep)
    if mode.gather_values and sparse and settings.config.top_n is not None:
        output = gathered_values(weights, value, keep, settings.config.top_n + settings.config.sink_keys)
    else:
        dropped = F.dropout(weights, p=dropout, training=module.training)
        output = torch.matmul(dropped.to(value.dtype), value)
    if store is not None and store.capture_details and had_scores:
        store.record_details(
            settings.name, query_sign=unit_q.to(torch.int8), key_sign=unit_k.to(torch.int8), keep=keep.expand_as(logits),
            weights=weights, output=output, alpha=torch.as_tensor(alpha), value=value,
        )  # fmt: skip
    return output.transpose(1, 2).contiguous(), weights


def _query_rows(tensor: torch.Tensor | None, rows: slice, query_len: int) -> torch.Tensor | None:
    """The query rows `rows` of a (..., q, k) mask or bias; one broadcast over the queries (q = 1) as it is."""
    if tensor is None or tensor.shape[-2] != query_len:
        return tensor
    return tensor[..., rows, :]


def _layer_record(store, settings: LayerSettings) -> LayerRecord:
    """The store's record of the calling layer: the one bound to its module (`HADCaptureStore.bound`; inside compiled
    code taken as it is), else the one of its name."""
    record = settings.record
    if record is not None and (settings.name is None or store.records.get(settings.name) is record):
        return record
    return store.record(settings.name)


def _record_attention_kl(store, record: LayerRecord, query, key, valid, mask_bias, student_scores) -> None:
    """This layer's KL(teacher || student) over its query rows, in chunks (`losses.chunked_attention_kl_terms`),
    against the teacher's `DenseScores` of the same layer. `student_scores(query_rows, rows)` makes the student's
    logits as its softmax sees them; the teacher's get the same mask bias, and each side its own position bias."""
    teacher = record.teacher_scores()
    teacher_key = repeat_kv(teacher.key, query.shape[1]).transpose(-1, -2)
    query_len = query.shape[-2]

    def teacher_rows(rows: slice) -> torch.Tensor:
        logits = torch.matmul(teacher.query[..., rows, :], teacher_key) * teacher.scaling
        position_bias = _query_rows(teacher.position_bias, rows, query_len)
        return _add_biases(logits, position_bias, _query_rows(mask_bias, rows, query_len))

    def student_rows(rows: slice) -> torch.Tensor:
        return student_scores(query[..., rows, :], rows)[0]

    query_mask = record.query_mask
    if query_mask is not None and (query_mask.dim() != 2 or query_mask.shape[-1] != query_len):
        query_mask = None  # the mask of another sequence (an encoder's, for decoder queries): every row counts
    record.kl_terms = chunked_attention_kl_terms(
        teacher_rows, student_rows, valid, query_len, query_mask, store.kl_chunk_rows
    )


def _runs_op(mode, store, module, query: torch.Tensor, value: torch.Tensor, dropout: float) -> bool:
    """Whether a binary-stage call can be the op: nothing to record, no gradient or dropout, not an export trace."""
    if mode.gather_values or mode.record_details or store is not None or (module.training and dropout > 0):
        return False
    return not (torch.is_grad_enabled() and (query.requires_grad or value.requires_grad))


def _op_attention(query, key, value, attention_mask, position_bias, is_causal, settings, scaling):
    """One `had::hamming_topk_attention` call: masks as a bool mask plus a causal flag, biases as one bias."""
    sigma_q, sigma_k = settings.sigmas
    mask, bias = None, position_bias
    if attention_mask is not None:
        mask, mask_bias = valid_keys_and_bias(attention_mask, query.shape[-2], key.shape[-2], False, query.device)
        bias = _add_biases(bias, mask_bias) if bias is not None else mask_bias
        is_causal = False  # a materialized mask already holds the causal structure
    output = ops.hamming_topk_attention(
        query, key, value, mask, bias, is_causal and query.shape[-2] > 1, settings.config.top_n,
        settings.config.top_n_ratio, float(sigma_q * sigma_k * scaling), settings.config.sink_keys,
    )  # fmt: skip
    return output.transpose(1, 2).contiguous(), None


def _had_logits(query, key, num_kv_heads: int, settings: LayerSettings, stage: str, scaling: float):
    """The stage's logits `s * Q~ K~^T` (and, in the binary stages, the ±1 queries and keys and alpha)."""
    sigma_q, sigma_k = settings.sigmas
    if isinstance(sigma_q, torch.Tensor):  # a bound record's, inside torch.compile: 0-d, or one per head
        sigma_q, sigma_k = (_head_sigma_tensor(sigma, query) for sigma in (sigma_q, sigma_k))
        sigma_k = repeat_kv(sigma_k, query.shape[1]) if sigma_k.dim() else sigma_k
    elif isinstance(sigma_q, tuple) or isinstance(sigma_k, tuple):
        sigma_q = _head_sigma(sigma_q, query.shape[1], settings.name, "sigma_q", query)
        sigma_k = repeat_kv(_head_sigma(sigma_k, num_kv_heads, settings.name, "sigma_k", query), query.shape[1])
    c, clip, transform_name = settings.state.temperature, settings.config.ste_clip, stage_transform(stage)
    if transform_name == "binary":
        unit_q, unit_k = sign(query), sign(key)
    elif transform_name == "ste":
        # ±1 factors keep the Hamming scores exact integers (ties stay ties); alpha is applied afterwards
        unit_q = transform(query, sigma_q, "ste", c, clip) / sigma_q
        unit_k = transform(key, sigma_k, "ste", c, clip) / sigma_k
    else:
        query_t = transform(query, sigma_q, transform_name, c, clip)
        key_t = transform(key, sigma_k, transform_name, c, clip)
        return torch.matmul(query_t, key_t.transpose(-1, -2)) * scaling, None, None, None
    alpha = sigma_q * sigma_k * scaling
    return torch.matmul(unit_q, unit_k.transpose(-1, -2)) * alpha, unit_q, unit_k, alpha


def boolean_mask_function(*args, **kwargs):
    """Mask interface entry for had_hf's attention names: always a materialized boolean mask (True = attend).

    Without an entry transformers passes `attention_mask=None` to a custom attention name (padding silently
    ignored); and the skips of the sdpa mask would leave the causal alignment of a cache (upper-left for a static
    cache's prefill) to the flag of a kernel that top-N selection does not use.
    """
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)
