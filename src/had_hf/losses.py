"""Distillation losses of METHOD.md section 4, as pure functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KL_CHUNK_ELEMENTS = 2**24
"""Logits per chunk of the chunked attention KL (rows x heads x batch x keys) when no row count is given: each of the
chunk's few float32 intermediates then takes 64 MB."""


def attention_kl_terms(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    valid: torch.Tensor,
    query_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of row-wise KL(softmax(teacher) || softmax(student)) over one layer's attention maps.

    Args:
        teacher_logits (`torch.Tensor`): (B, H, q, k) logits as the teacher's softmax sees them.
        student_logits (`torch.Tensor`): (B, H, q, k) the student's, dense (before top-N).
        valid (`torch.Tensor`): bool, broadcastable to (B, H, q, k); masked keys are excluded from both softmaxes.
        query_mask (`torch.Tensor`, *optional*): (B, q) bool or 0/1; padded query rows are excluded.

    Returns:
        `(sum of the KL over counted rows, number of counted rows)`; rows without a valid key are not counted.
    """
    # the mask keeps its own (broadcast) size: inverted and reduced over the keys once, not once per head
    invalid = ~valid
    floor = torch.finfo(torch.float32).min
    log_p_teacher = torch.log_softmax(_at_least_float32(teacher_logits).masked_fill(invalid, floor), dim=-1)
    log_p_student = torch.log_softmax(_at_least_float32(student_logits).masked_fill(invalid, floor), dim=-1)
    pointwise = torch.where(valid, log_p_teacher.exp() * (log_p_teacher - log_p_student), 0.0)
    row_kl = pointwise.sum(dim=-1)  # (B, H, q)
    rows = valid.expand(*valid.shape[:-1], teacher_logits.shape[-1]).any(dim=-1).expand_as(row_kl)
    if query_mask is not None:
        rows = rows & query_mask.bool()[:, None, :]
    return _sum_last_dim_first(row_kl * rows), rows.sum()


def _sum_last_dim_first(values: torch.Tensor) -> torch.Tensor:
    """The sum of all of `values`, over its last dimension first, then over the others. Inductor's CPU code guards the
    length of each floating-point sum against 4,096: one sum over batch x (heads x) tokens would cross it as batch
    lengths change and recompile the loss's graph, where a sum over a row and one over the rows stay on one side."""
    return values.sum(dim=-1).sum()


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits; float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def chunked_attention_kl_terms(
    teacher_rows: Callable[[slice], torch.Tensor],
    student_rows: Callable[[slice], torch.Tensor],
    valid: torch.Tensor,
    query_len: int,
    query_mask: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_kl_terms` of one layer computed in chunks of query rows, never holding the layer's (q, k) maps.

    Each chunk's logits are made by `teacher_rows(rows)` / `student_rows(rows)` ((B, H, len(rows), k) for the query
    rows `rows`, a slice) and reduced to a KL sum at once. Where gradients are recorded, each chunk runs under
    non-reentrant activation checkpointing: only the chunk functions' inputs (the queries and keys) stay alive until
    the backward pass, which recomputes the chunk's logits. Peak memory is then one chunk's logits and their few
    intermediates, whatever the sequence length; the result equals `attention_kl_terms` of the full maps up to the
    order of the sums.

    Args:
        teacher_rows, student_rows: the two sides' logits for a slice of query rows, as each side's softmax sees them.
        valid (`torch.Tensor`): bool, broadcastable to (B, H, q, k), as for `attention_kl_terms`.
        query_len (`int`): q, the number of query rows.
        query_mask (`torch.Tensor`, *optional*): (B, q) real (non-padding) query rows.
        chunk_rows (`int`, *optional*): query rows per chunk; default: as many as keep a chunk at `KL_CHUNK_ELEMENTS`
            logits.

    Returns:
        `(sum of the KL over counted rows, number of counted rows)`.
    """
    if chunk_rows is None:
        first = teacher_rows(slice(0, 1))
        chunk_rows = max(1, KL_CHUNK_ELEMENTS // max(1, first.numel()))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}.")
    total, count, start = None, None, 0
    # a while loop, not range(): under torch.compile range() would fix the sequence length (recompiling for each one),
    # where these comparisons only guard on the number of chunks
    while start < query_len:
        rows = slice(start, min(start + chunk_rows, query_len))
        start = rows.stop
        valid_rows = valid[..., rows, :] if valid.shape[-2] == query_len else valid
        mask_rows = query_mask[:, rows] if query_mask is not None else None

        def chunk(rows=rows, valid_rows=valid_rows, mask_rows=mask_rows):
            return attention_kl_terms(teacher_rows(rows), student_rows(rows), valid_rows, mask_rows)

        if torch.is_grad_enabled():
            chunk_sum, chunk_count = checkpoint(chunk, use_reentrant=False, preserve_rng_state=False)
        else:
            chunk_sum, chunk_count = chunk()
        total = chunk_sum if total is None else total + chunk_sum
        count = chunk_count if count is None else count + chunk_count
    return total, count


def attention_kl(
    teacher_logits: Mapping[str, torch.Tensor],
    student_logits: Mapping[str, torch.Tensor],
    valid: Mapping[str, torch.Tensor],
    query_masks: Mapping[str, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """L_attn: the mean over all layers, heads, sequences and valid query rows of the row-wise KL.

    Args:
        teacher_logits, student_logits: per layer name, (B, H, q, k) logits (as collected by `HADCaptureStore`).
        valid: per layer name, the boolean key mask.
        query_masks: per layer name, (B, q) mask of real (non-padding) queries, or None for all rows.
    """
    missing = sorted(set(student_logits) ^ set(teacher_logits))
    if missing:
        raise ValueError(
            f"Teacher and student attention layers differ: {missing}. The student must be a copy of the teacher."
        )
    terms = {
        name: attention_kl_terms(teacher_logits[name], student, valid[name], (query_masks or {}).get(name))
        for name, student in student_logits.items()
    }
    return mean_attention_kl(terms)


def mean_attention_kl(terms: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """L_attn from per-layer `(KL sum, counted rows)`: the total KL over the total number of counted rows."""
    if not terms:
        raise ValueError("No attention layer recorded an attention KL.")
    total = sum(layer_sum for layer_sum, _ in terms.values())
    count = sum(layer_count for _, layer_count in terms.values())
    return total / count.clamp(min=1)


def output_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """L_out: KL(softmax(z_T) || softmax(z_S)) over the last dim, averaged over examples (or valid tokens).

    Args:
        teacher_logits, student_logits (`torch.Tensor`): (B, C) or (B, T, C).
        mask (`torch.Tensor`, *optional*): (B, T) tokens to count for token-level outputs.
    """
    log_p_teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_p_student = torch.log_softmax(student_logits.float(), dim=-1)
    per_item = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    if mask is None:
        return per_item.mean()
    mask = mask.to(per_item.dtype)
    return _sum_last_dim_first(per_item * mask) / _sum_last_dim_first(mask).clamp(min=1)


def output_mse(teacher_outputs: torch.Tensor, student_outputs: torch.Tensor) -> torch.Tensor:
    """L_out for a regression head (STS-B): mean squared error between the two outputs."""
    return F.mse_loss(student_outputs.float(), teacher_outputs.float())


def is_decoder_layer(name: str) -> bool:
    """Whether an attention layer of an encoder-decoder model takes its queries from the decoder (its self- and
    cross-attention), by its module name."""
    return name.startswith("decoder.") or ".decoder." in name


def query_mask(inputs: dict, decoder: bool = False) -> torch.Tensor | None:
    """The (B, T) real (non-padding) positions of the sequence a layer's queries come from: the decoder's mask for
    decoder queries, else the encoder's (by side, not by length: an encoder mask as long as the decoder sequence would
    mask the wrong positions)."""
    mask = inputs.get("decoder_attention_mask" if decoder else "attention_mask")
    return mask if mask is not None and mask.dim() == 2 else None


def token_mask(inputs: dict, outputs, encoder_decoder: bool = False) -> torch.Tensor | None:
    """For token-level outputs (B, T, C): count only real tokens in the output KL (the decoder's, for an
    encoder-decoder model)."""
    logits = outputs.logits
    mask = query_mask(inputs, encoder_decoder) if logits.dim() == 3 else None
    return mask if mask is not None and mask.shape[-1] == logits.shape[1] else None
