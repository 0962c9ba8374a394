"""The runtime stage of a HAD model: which query/key transform its attention applies now, and the tanh temperature c.

`HADConfig` is what a checkpoint saves (N, sigma, which modules). The stage is not saved: it belongs to a training
run, which owns a `HADRuntimeState` and moves it through the stages (`HADStageCallback`). A model that was converted
or loaded and is not being trained is in the `inference` stage, the exact binary attention of METHOD.md section 1.

Stages, in training order (METHOD.md section 2):

| stage | transform of Q and K | gradient |
|---|---|---|
| `tanh` | `sigma * c * tanh(x / (c * sigma))` | exact |
| `sign` | `sigma * tanh(x / (c * sigma))` | exact |
| `ste` | `sigma * sign(x)` | clipped straight-through |
| `refinement` | `sigma * sign(x)` | clipped straight-through (no attention loss) |
| `inference` | `sigma * sign(x)` | none (the `had::hamming_topk_attention` op) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STAGES = ("tanh", "sign", "ste", "refinement", "inference")
TRAINING_STAGES = STAGES[:-1]
INFERENCE = "inference"

# the transform of `had_hf.binarize.transform` that each stage applies
_TRANSFORMS = {"tanh": "tanh", "sign": "sign", "ste": "ste", "refinement": "ste", "inference": "binary"}

STATE_ATTRIBUTE = "_had_state"


def stage_transform(stage: str) -> str:
    """The name of the query/key transform (`had_hf.binarize.transform`) that `stage` applies."""
    return _TRANSFORMS[stage]


@dataclass
class HADRuntimeState:
    """The stage a HAD model's attention is in, shared by all of its attention modules.

    Args:
        stage (`str`, *optional*, defaults to `"inference"`): one of `STAGES`.
        c (`float`, *optional*, defaults to 1.0): the temperature of the `tanh` and `sign` stages.
    """

    stage: str = INFERENCE
    c: float = 1.0

    def __post_init__(self):
        self._c_tensor = torch.zeros((), dtype=torch.float32)
        self.set(self.stage, self.c)

    def set(self, stage: str, c: float | None = None) -> None:
        """Moves to `stage` (and `c`), checking both."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}.")
        if c is not None:
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
                raise ValueError(f"c must be a finite number > 0, got {c!r}.")
            self.c = float(c)
            self._c_tensor.fill_(self.c)  # on a device: a kernel launch, no copy from the host
        self.stage = stage

    @property
    def temperature(self) -> torch.Tensor:
        """c as the attention reads it: a 0-d float32 tensor holding it, in eager and in compiled code alike.

        The schedule changes c at every step. Compiled code guards on a Python float (it would recompile, or trace
        c as a symbolic input only after a first recompilation); a tensor is a graph input whose value may change
        freely. Eager code reads the same tensor, so that both compute `c * sigma` in the same precision: a
        last-bit difference there flips near-ties of the sign stage's top N. It is written in place by `set`,
        which is called between steps, never between a forward pass and its backward.
        """
        return self._c_tensor

    def to(self, device: torch.device | str) -> HADRuntimeState:
        """Keeps the tensor of `temperature` on `device` (the model's), so that the attention's kernels read it there
        and `set` updates it without a host-to-device copy. Returns the state."""
        self._c_tensor = self._c_tensor.to(device)
        return self

    @property
    def transform(self) -> str:
        """The name of the query/key transform (`had_hf.binarize.transform`) of the stage."""
        return _TRANSFORMS[self.stage]


def attach_state(model: torch.nn.Module, state: HADRuntimeState) -> HADRuntimeState:
    """Makes `state` the runtime state of `model` and of each of its HAD attention modules."""
    for module in model.modules():
        if module is model or getattr(module, "_had_name", None) is not None:
            setattr(module, STATE_ATTRIBUTE, state)
    return state


def runtime_state(model: torch.nn.Module) -> HADRuntimeState:
    """The runtime state of a HAD model (created in the `inference` stage if it has none)."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        state = attach_state(model, HADRuntimeState())
    return state


def set_stage(model: torch.nn.Module, stage: str, c: float | None = None) -> HADRuntimeState:
    """Puts a HAD model's attention in `stage` (one of `STAGES`), with temperature `c` for `tanh` / `sign`.

    Example:

    ```python
    >>> had_hf.set_stage(student, "tanh", c=5.0)  # what the distillation trainer does at step 0
    >>> had_hf.set_stage(student, "inference")  # exact binary attention, the saved model's
    ```
    """
    state = runtime_state(model)
    state.set(stage, c)
    return state
