"""Distillation losses of METHOD.md section 4, as pure functions."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F


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
    valid = valid.expand_as(teacher_logits)
    floor = torch.finfo(torch.float32).min
    log_p_teacher = torch.log_softmax(teacher_logits.float().masked_fill(~valid, floor), dim=-1)
    log_p_student = torch.log_softmax(student_logits.float().masked_fill(~valid, floor), dim=-1)
    pointwise = torch.where(valid, log_p_teacher.exp() * (log_p_teacher - log_p_student), 0.0)
    row_kl = pointwise.sum(dim=-1)  # (B, H, q)
    rows = valid.any(dim=-1)
    if query_mask is not None:
        rows = rows & query_mask.bool()[:, None, :]
    return (row_kl * rows).sum(), rows.sum()


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
    total = torch.zeros((), dtype=torch.float32, device=next(iter(student_logits.values())).device)
    count = torch.zeros((), dtype=torch.long, device=total.device)
    for name, student in student_logits.items():
        query_mask = (query_masks or {}).get(name)
        layer_sum, layer_count = attention_kl_terms(teacher_logits[name], student, valid[name], query_mask)
        total = total + layer_sum
        count = count + layer_count
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
    return (per_item * mask).sum() / mask.sum().clamp(min=1)


def output_mse(teacher_outputs: torch.Tensor, student_outputs: torch.Tensor) -> torch.Tensor:
    """L_out for a regression head (STS-B): mean squared error between the two outputs."""
    return F.mse_loss(student_outputs.float(), teacher_outputs.float())
