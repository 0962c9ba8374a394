"""The query/key transforms of the four HAD stages (METHOD.md section 2)."""

from __future__ import annotations

import torch


def sign(x: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1 (METHOD.md's choice), in the dtype of `x`."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _ClippedStraightThroughSign(torch.autograd.Function):
    """Forward `sigma * sign(x)`; backward passes the gradient where `pass_through` (`|x / sigma| <= clip`, the clipped
    STE: d(sigma * sign(x))/dx replaced by d(sigma * clamp(x / sigma, -clip, clip))/dx, 1 inside the clip). The mask
    comes in made: compiled with dynamic shapes, clip is a symbolic number that the function's own traced graphs
    cannot take (dynamo fails to lift it), and a saved mask is one byte per element."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sigma: float, pass_through: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pass_through)
        return sigma * sign(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (pass_through,) = ctx.saved_tensors
        return grad_output * pass_through.to(grad_output.dtype), None, None


def transform(x: torch.Tensor, sigma: float, stage: str, c: float = 1.0, ste_clip: float = 1.0) -> torch.Tensor:
    """Applies the stage's transform to queries or keys.

    Args:
        x (`torch.Tensor`): queries or keys, any shape.
        sigma (`float` or `torch.Tensor`): the layer's standardization coefficient (sigma_Q or sigma_K), or one per
            head as a tensor broadcastable to `x` (e.g. (1, H, 1, 1)).
        stage (`str`): `"tanh"`, `"sign"`, `"ste"` or `"binary"`.
        c (`float` or `torch.Tensor`): the temperature of the tanh stages (the attention passes a 0-d tensor,
            `HADRuntimeState.temperature`).
        ste_clip (`float`): the STE clip bound t.
    """
    if stage == "tanh":
        return sigma * c * torch.tanh(x / (c * sigma))
    if stage == "sign":
        return sigma * torch.tanh(x / (c * sigma))
    if stage == "ste":
        return _ClippedStraightThroughSign.apply(x, sigma, (x / sigma).abs() <= ste_clip)
    if stage == "binary":
        return sigma * sign(x)
    raise ValueError(f"Unknown HAD stage {stage!r}; expected one of 'tanh', 'sign', 'ste', 'binary'.")
