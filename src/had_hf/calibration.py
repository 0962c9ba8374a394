"""Standardization coefficients sigma_Q / sigma_K (METHOD.md section 3)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .capture import STORE_KWARG, HADCaptureStore, forward_inputs
from .config import HADConfig
from .integration import set_attention
from .modes import DENSE_CAPTURE


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    num_batches: int = 100,
    per_head: bool | None = None,
) -> HADConfig:
    """Measures per-layer (or per-head) sigma_Q and sigma_K and stores them in the model's HADConfig.

    The model runs with dense attention (the teacher's, "equivalently the unmodified student") on `num_batches`
    batches; for each attention layer and batch the standard deviation over all elements of its queries and keys is
    taken, and sigma is the mean over batches. Padding positions are included, as in the paper's description.

    Args:
        model (`PreTrainedModel`): a model converted with `had_hf.convert` (or loaded with a HADConfig).
        dataloader: yields dicts of model inputs (labels are dropped).
        num_batches (`int`, *optional*, defaults to 100): batches to average over (fewer if the loader ends).
        per_head (`bool`, *optional*): one sigma per head (std over batch, positions and dimensions of that head)
            instead of one per layer; defaults to the HADConfig's `sigma_per_head`.

    Returns:
        `HADConfig`: the model's config, with `sigma_q` and `sigma_k` filled in.
    """
    had_config = getattr(model.config, "quantization_config", None)
    if not isinstance(had_config, HADConfig):
        raise ValueError("calibrate needs a HAD model: call `had_hf.convert(model, HADConfig(...))` first.")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}.")
    previous_implementation = model.config._attn_implementation
    was_training = model.training
    if per_head is None:
        per_head = had_config.sigma_per_head
    store = HADCaptureStore(capture_logits=False, capture_qk_std=True, qk_std_per_head=per_head)
    sums: dict[str, list] = {}
    seen = 0
    device = next(model.parameters()).device
    model.eval()
    set_attention(model, DENSE_CAPTURE.name)
    try:
        for batch in dataloader:
            if seen == num_batches:
                break
            inputs = forward_inputs(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
            store.clear()
            model(**inputs, **{STORE_KWARG: store})
            for name, (std_q, std_k) in store.qk_std.items():
                totals = sums.setdefault(name, [torch.zeros(len(std_q) if per_head else 1, dtype=torch.float64),
                                                torch.zeros(len(std_k) if per_head else 1, dtype=torch.float64), 0])  # fmt: skip
                totals[0] += torch.tensor(std_q, dtype=torch.float64)
                totals[1] += torch.tensor(std_k, dtype=torch.float64)
                totals[2] += 1
            seen += 1
    finally:
        set_attention(model, previous_implementation)
        model.train(was_training)
    if seen == 0:
        raise ValueError("calibrate received an empty dataloader.")

    def mean(total: torch.Tensor, count: int) -> float | list[float]:
        values = (total / count).tolist()
        return values if per_head else values[0]

    had_config.sigma_q = {name: mean(total[0], total[2]) for name, total in sums.items()}
    had_config.sigma_k = {name: mean(total[1], total[2]) for name, total in sums.items()}
    had_config.sigma_per_head = per_head
    return had_config
