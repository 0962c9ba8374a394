"""The stage schedule as Trainer callbacks: c decay, stage switches, the stage-4 learning rate, evaluations; and
`BestDeployableCallback`, which keeps the best deployable stage end."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from .schedule import StageSchedule
from .state import INFERENCE, HADRuntimeState

logger = logging.getLogger(__name__)


class HADStageCallback(TrainerCallback):
    """Moves the student's runtime state (`had_hf.state`) through the stages before every optimizer step, and sets
    the learning rate of stage 4 (and of stage 3, when `ste_learning_rate` is given).

    With an evaluation set it asks for an evaluation at the end of every stage (the last step included), and calls
    `on_binary_start` (if given) before the first step of the STE stage, where the forward becomes exactly binary.

    All of it is a function of `state.global_step` (see `StageSchedule`), so resuming from a checkpoint restores it
    exactly. The learning-rate scheduler recomputes `param_groups[i]["lr"]` from its `base_lrs` at every step, so
    a stage's rate is written into `base_lrs` (what the scheduler reads) as well as into the param groups.
    """

    def __init__(
        self,
        state: HADRuntimeState,
        schedule: StageSchedule,
        refinement_learning_rate: float,
        evaluate_at_stage_ends: bool = True,
        on_binary_start: Callable[[], None] | None = None,
        ste_learning_rate: float | None = None,
    ):
        self.state = state
        self.schedule = schedule
        self.refinement_learning_rate = refinement_learning_rate
        # the stages whose rate differs from the optimizer's own (stages 1-2 keep it)
        self.stage_learning_rates = {4: refinement_learning_rate}
        if ste_learning_rate is not None:
            self.stage_learning_rates[3] = ste_learning_rate
        self.evaluate_at_stage_ends = evaluate_at_stage_ends
        self.on_binary_start = on_binary_start
        self.current_phase: int | None = None

    def _apply(self, step: int, optimizer=None, lr_scheduler=None) -> None:
        phase = self.schedule.phase(step)
        self.state.set(self.schedule.stage(step), self.schedule.c(step))
        if phase != self.current_phase:
            logger.info("HAD: step %d starts stage %d (%s).", step, phase, self.state.stage)
            self.current_phase = phase
            if phase == 3 and step == self.schedule.stage2_end and self.on_binary_start is not None:
                self.on_binary_start()
        base = self.stage_learning_rates.get(phase)
        if base is not None and optimizer is not None:
            if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
                lr_scheduler.base_lrs = [base] * len(lr_scheduler.base_lrs)
            rate = base * _scheduler_factor(lr_scheduler)
            for group in optimizer.param_groups:
                if group.get("initial_lr") is not None:
                    group["initial_lr"] = base
                group["lr"] = rate
            if lr_scheduler is not None and hasattr(lr_scheduler, "_last_lr"):
                # the Trainer logs get_last_lr() of the step being taken: make it report the rate really used
                lr_scheduler._last_lr = [rate] * len(optimizer.param_groups)

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self._apply(state.global_step, optimizer, lr_scheduler)

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self._apply(state.global_step, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.evaluate_at_stage_ends and state.global_step in self.schedule.stage_ends():
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


class BestDeployableCallback(TrainerCallback):
    """Keeps the student of the best deployable evaluation (`HADDistillationTrainer.evaluate_deployable`, run at the
    stage ends) and puts it back when training ends, so the trained model is the best stage end's.

    Args:
        metric (`str`): the logged key to compare, e.g. `"deployable_accuracy"`.
        had_config (`HADConfig`): the student's config: its sigma is kept with the weights (re-calibration may change
            it between stage ends).
        greater_is_better (`bool`, *optional*, defaults to `True`): whether a larger value is better.

    The trainable parameters and the sigmas are copied to the CPU at each improvement (all processes hold the same
    copy under DDP). A run resumed from a checkpoint compares only the stage ends evaluated after the resume.
    """

    def __init__(self, metric: str, had_config, greater_is_better: bool = True):
        self.metric = metric
        self.had_config = had_config
        self.greater_is_better = greater_is_better
        self.best: float | None = None
        self.best_step: int | None = None
        self.restored = False
        self._kept: tuple[dict[str, torch.Tensor], dict, dict] | None = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not metrics or self.metric not in metrics or model is None:
            return
        value = metrics[self.metric]
        if self.best is None or (value > self.best if self.greater_is_better else value < self.best):
            self.best, self.best_step = value, state.global_step
            weights = {
                name: parameter.detach().to("cpu", copy=True)
                for name, parameter in model.named_parameters()
                if parameter.requires_grad
            }
            self._kept = (weights, copy.deepcopy(self.had_config.sigma_q), copy.deepcopy(self.had_config.sigma_k))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._kept is None or model is None or self.best_step == state.global_step:
            return
        weights, self.had_config.sigma_q, self.had_config.sigma_k = self._kept
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)
        self.restored = True
        logger.info(
            "HAD: kept the student of step %d (%s %.4f), the best deployable stage end.",
            self.best_step,
            self.metric,
            self.best,
        )

    def summary(self) -> dict:
        """What was kept: the metric, its best value and step, and whether the final weights were replaced."""
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step, "restored": self.restored}
