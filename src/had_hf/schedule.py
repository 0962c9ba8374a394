"""The four-stage schedule of METHOD.md section 2 as a pure function of the optimizer step.

Everything (stage, c, attention-loss switch, learning-rate drop) follows from `global_step`, so a run resumed from
a checkpoint is in exactly the state of an uninterrupted run at the same step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PHASE_NAMES = {1: "tanh", 2: "sign", 3: "ste", 4: "refinement"}


@dataclass(frozen=True)
class StageSchedule:
    """Step boundaries of the four stages and the decay of c.

    Args:
        c_start, c_switch, c_end (`float`): c decays from `c_start`; stage 1 ends when it reaches `c_switch`, stage 2
            when it reaches `c_end`.
        gamma (`float`): the per-step decay factor actually used (the configured one, or its proportional
            equivalent when the schedule is shortened).
        stage1_end, stage2_end, stage3_end, total (`int`): first step of stages 2, 3, 4, and the total step count.
        skip_tanh (`bool`): the "w/o tanh" ablation: stages 1-2 run the STE instead, for as many steps.
        scale (`float`): the factor the configured schedule was stretched by (1.0: the paper's).
    """

    c_start: float
    c_switch: float
    c_end: float
    gamma: float
    stage1_end: int
    stage2_end: int
    stage3_end: int
    total: int
    skip_tanh: bool = False
    scale: float = 1.0

    @classmethod
    def build(
        cls,
        c_start: float = 5.0,
        c_switch: float = 1.0,
        c_end: float = 0.05,
        gamma: float = 0.9995,
        ste_steps: int = 10_000,
        refinement_steps: int = 10_000,
        skip_tanh: bool = False,
        max_steps: int | None = None,
    ) -> StageSchedule:
        """The paper's schedule; with `max_steps`, every stage stretched in proportion to total `max_steps`."""
        if not c_start > c_switch > c_end > 0:
            raise ValueError(f"Need c_start > c_switch > c_end > 0, got {c_start}, {c_switch}, {c_end}.")
        if not 0 < gamma < 1:
            raise ValueError(f"The c decay factor must be in (0, 1), got {gamma}.")
        if ste_steps < 0 or refinement_steps < 0:
            raise ValueError(
                f"Step counts must be >= 0, got ste_steps={ste_steps}, refinement_steps={refinement_steps}."
            )
        full = cls._from_gamma(c_start, c_switch, c_end, gamma, ste_steps, refinement_steps, skip_tanh, 1.0)
        if max_steps is None or max_steps <= 0 or max_steps == full.total:
            return full
        if max_steps < 4:
            raise ValueError(f"max_steps={max_steps} cannot hold the four stages; use at least 4 steps.")
        scale = max_steps / full.total
        # gamma ** (1 / scale) makes c cover the same range in `scale` times the steps. A stage asked for with 0 steps
        # keeps 0; any other keeps at least 1, so rounding never removes a stage.
        scaled = cls._from_gamma(
            c_start,
            c_switch,
            c_end,
            gamma ** (1.0 / scale),
            max(1, round(ste_steps * scale)) if ste_steps else 0,
            0,
            skip_tanh,
            scale,
        )
        # without a refinement stage the STE stage (or, without both, the sign stage) ends the schedule
        stage3_end = min(scaled.stage3_end, max_steps - 1) if refinement_steps else max_steps
        stage2_end = min(scaled.stage2_end, stage3_end - 1) if ste_steps else stage3_end
        return cls(
            c_start,
            c_switch,
            c_end,
            scaled.gamma,
            min(scaled.stage1_end, stage2_end - 1),
            stage2_end,
            stage3_end,
            max_steps,
            skip_tanh,
            scale,
        )

    @classmethod
    def _from_gamma(cls, c_start, c_switch, c_end, gamma, ste_steps, refinement_steps, skip_tanh, scale):
        stage1_end = max(1, math.ceil(math.log(c_switch / c_start) / math.log(gamma)))
        stage2_end = max(stage1_end + 1, math.ceil(math.log(c_end / c_start) / math.log(gamma)))
        stage3_end = stage2_end + ste_steps
        return cls(
            c_start, c_switch, c_end, gamma, stage1_end, stage2_end, stage3_end, stage3_end + refinement_steps,
            skip_tanh, scale,
        )  # fmt: skip

    def phase(self, step: int) -> int:
        """1 (tanh), 2 (sign), 3 (STE) or 4 (refinement) for the optimizer step about to run."""
        if step < self.stage1_end:
            return 1
        if step < self.stage2_end:
            return 2
        if step < self.stage3_end:
            return 3
        return 4

    def stage(self, step: int) -> str:
        """The runtime stage (`had_hf.state.STAGES`) of the student at `step`: the phase's name, but `ste` in phases
        1-2 of the "w/o tanh" ablation."""
        phase = self.phase(step)
        return "ste" if phase <= 2 and self.skip_tanh else PHASE_NAMES[phase]

    def c(self, step: int) -> float:
        """c before the update of `step`: c_start * gamma**step, held at c_end once stage 2 is over."""
        return max(self.c_start * self.gamma**step, self.c_end) if step < self.stage2_end else self.c_end

    def timeline(self) -> list[dict]:
        """The stage boundaries: [{phase, stage, start_step, end_step}, ...] (end exclusive)."""
        edges = [0, self.stage1_end, self.stage2_end, self.stage3_end, self.total]
        return [
            {"phase": p, "stage": PHASE_NAMES[p], "start_step": edges[p - 1], "end_step": edges[p]}
            for p in (1, 2, 3, 4)
        ]

    def stage_ends(self) -> dict[int, str]:
        """{step: name of the stage that ends there} for the stages that have steps. A stage left out (0 steps) ends
        where the one before it ends: that step keeps the earlier stage's name."""
        return {
            entry["end_step"]: entry["stage"] for entry in self.timeline() if entry["end_step"] > entry["start_step"]
        }

    def describe(self) -> str:
        lengths = ", ".join(f"{e['stage']} {e['end_step'] - e['start_step']}" for e in self.timeline())
        text = f"{self.total} steps ({lengths}; c {self.c_start} -> {self.c_switch} -> {self.c_end}, gamma {self.gamma:.6g})"
        if self.scale != 1.0:
            text += f", every stage scaled by {self.scale:.4g} from the paper's schedule"
        return text

    def to_dict(self) -> dict:
        return asdict(self)
