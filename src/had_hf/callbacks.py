"""The stage schedule as Trainer callbacks: c decay, stage switches, the stage-4 learning rate, evaluations."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from .schedule import StageSchedule
from .state import INFERENCE, HADRuntimeState

logger = logging.getLogger(__name__)


class HADStageCallback(TrainerCallback):
    """Moves the student's runtime state (`had_hf.state`) through the stages before every optimizer step, and lowers
    the learning rate at stage 4.

    All of it is a function of `state.global_step` (see `StageSchedule`), so resuming from a checkpoint restores it
    exactly. The learning-rate scheduler recomputes `param_groups[i]["lr"]` from its `base_lrs` at every step, so
    the stage-4 rate is written into `base_lrs` (what the scheduler reads) as well as into the param groups.
    """

    def __init__(
        self,
        state: HADRuntimeState,
        schedule: StageSchedule,
        refinement_learning_rate: float,
        evaluate_at_stage_ends: bool = True,
    ):
        self.state = state
        self.schedule = schedule
        self.refinement_learning_rate = refinement_learning_rate
        self.evaluate_at_stage_ends = evaluate_at_stage_ends
        self.current_phase: int | None = None

    def _apply(self, step: int, optimizer=None, lr_scheduler=None) -> None:
        phase = self.schedule.phase(step)
        self.state.set(self.schedule.stage(step), self.schedule.c(step))
        if phase != self.current_phase:
            logger.info("HAD: step %d starts stage %d (%s).", step, phase, self.state.stage)
            self.current_phase = phase
        if phase == 4 and optimizer is not None:
            if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
                lr_scheduler.base_lrs = [self.refinement_learning_rate] * len(lr_scheduler.base_lrs)
            rate = self.refinement_learning_rate * _scheduler_factor(lr_scheduler)
            for group in optimizer.param_groups:
                if group.get("initial_lr") is not None:
                    group["initial_lr"] = self.refinement_learning_rate
                group["lr"] = rate
            if lr_scheduler is not None and hasattr(lr_scheduler, "_last_lr"):
                # the Trainer logs get_last_lr() of the step being taken: make it report the rate really used
                lr_scheduler._last_lr = [rate] * len(optimizer.param_groups)

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self._apply(state.global_step, optimizer, lr_scheduler)

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self._apply(state.global_step, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, **kwargs):
        boundaries = (self.schedule.stage1_end, self.schedule.stage2_end, self.schedule.stage3_end)
        if self.evaluate_at_stage_ends and state.global_step in boundaries:
            # evaluated with the finished stage's transform: the next stage is applied at the next step's begin
            control.should_evaluate = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # The trained student is used for inference: sign forward, no straight-through gradient.
        self.state.set(INFERENCE, self.schedule.c_end)


def _scheduler_factor(lr_scheduler) -> float:
    """The scheduler's current multiplier of its base rate (1.0 for the constant schedule or none)."""
    if lr_scheduler is None or not hasattr(lr_scheduler, "lr_lambdas"):
        return 1.0
    return float(lr_scheduler.lr_lambdas[0](lr_scheduler.last_epoch))
