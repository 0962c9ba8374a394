"""The causal-LM recipe's time budget (`recipes.common.time_budget`): the steps that fit, and a timed step that runs
the student as training will (compiled, where the run compiles)."""

import time
import types

import pytest
import torch

from had_hf.schedule import StageSchedule
from recipes.common import time_budget
from tests.test_compile import _fresh_dynamo, _graphs, _llama_trainer

PAPER_STAGE_STEPS = (3219, 5990, 10_000, 10_000)
"""The paper's schedule (tanh, sign, STE, refinement), as `StageSchedule.build()` makes it."""


def _trainer(torch_compile: bool, weights: tuple[float, float, float, float]):
    args = types.SimpleNamespace(torch_compile=torch_compile, stage_attention_loss_weights=lambda: weights)
    return types.SimpleNamespace(args=args, schedule=StageSchedule.build())


def test_the_schedule_is_the_papers():
    schedule = StageSchedule.build()
    assert [e["end_step"] - e["start_step"] for e in schedule.timeline()] == list(PAPER_STAGE_STEPS)


class FakeClock:
    """A clock that the fake timed steps advance by what they would take (the first step and two more)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def timed_step(self, first_step_s: float, step_s: float) -> dict:
        self.now += first_step_s + 2 * step_s
        return {"first_step_s": first_step_s, "step_s": step_s}


@pytest.mark.parametrize("torch_compile, compile_s", [(False, 0.0), (True, 10.0)])
def test_the_budget_reserves_the_evaluations_saving_and_the_untimed_stages_compiling(
    monkeypatch, torch_compile, compile_s
):
    """1,000 s to the deadline, steps of 1 s (the first 11 s), evaluations of no time, no attention loss (one kind of
    step, timed in stage 1): the timed steps spend 13 s; then 30 s for saving, and compiled 3 x 10 s for the stages
    that no timed step compiled; the rest in steps of 1.1 s (a tenth for logging and the like)."""
    clock, timed = FakeClock(), []

    def step(trainer, phase):
        timed.append(phase)
        return clock.timed_step(11.0, 1.0)

    monkeypatch.setattr(time_budget, "time_distillation_step", step)
    budget = time_budget.steps_for_budget(_trainer(torch_compile, (0.0,) * 4), 1000.0, 0.0, 0.0, clock=clock)
    assert timed == [1] and budget["remaining_s"] == 987.0 and budget["timing_s"] == 13.0
    assert budget["compile_s"] == compile_s and budget["reserve_s"] == 30.0 + 3 * compile_s
    assert budget["max_steps"] == int((987.0 - budget["reserve_s"]) / 1.1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.0, 0.0), (1.0, 1.0, 0.0, 2.0)])
def test_the_budget_weighs_steps_with_and_without_the_attention_kl_by_their_share_of_the_schedule(
    monkeypatch, weights
):
    """A step with the attention KL takes 1 s, one without it 0.5 s: the budget times the first phase of each kind (1,
    and 3 where the STE stage has no attention loss) and sizes the run on their mean over the schedule's steps.
    Compiled, the stage graph of the second timed kind took 4 s (the first 20 s, with the teacher's): 4 s reserved for
    each of the two stages not timed."""
    clock, timed = FakeClock(), []

    def step(trainer, phase):
        timed.append(phase)
        return clock.timed_step(21.0, 1.0) if weights[phase - 1] > 0 else clock.timed_step(4.5, 0.5)

    monkeypatch.setattr(time_budget, "time_distillation_step", step)
    budget = time_budget.steps_for_budget(_trainer(True, weights), 1000.0, final_eval_s=0.0, stage_eval_s=0.0,
                                          clock=clock)  # fmt: skip
    with_kl = sum(steps for steps, weight in zip(PAPER_STAGE_STEPS, weights) if weight > 0) / sum(PAPER_STAGE_STEPS)
    mean_step_s = with_kl * 1.0 + (1 - with_kl) * 0.5
    assert timed == [1, 3] and budget["remaining_s"] == 1000.0 - 23.0 - 5.5
    assert budget["compile_s"] == 4.0 and budget["reserve_s"] == 30.0 + 2 * 4.0
    assert budget["max_steps"] == int((1000.0 - 28.5 - 38.0) / (1.1 * mean_step_s))
    assert budget["step_s_by_kind"] == {"attention_kl": 1.0, "output_only": 0.5}
    assert budget["share_by_kind"]["attention_kl"] == pytest.approx(with_kl, abs=1e-4)


def test_the_timed_steps_compile_the_graphs_that_training_then_reuses(tmp_path, monkeypatch):
    """Regional compilation (dynamo alone), the STE stage without the attention loss (as the SmolLM2 config): the
    budget times a step of stage 1 and one of stage 3 on the student compiled layer by layer; the trainer's own model
    is left uncompiled, in its stage and at its step, without gradients, and the training that follows compiles no
    graph beyond those of the same training without the timed steps. Both students are calibrated first, as the
    recipe calibrates before it times a step."""
    _fresh_dynamo()
    plain = _llama_trainer(tmp_path / "plain", "eager", regional=True, ste_attention_loss_weight=0.0)
    plain.calibrate()
    plain.train()
    graphs_of_training = _graphs()

    _fresh_dynamo()
    trainer = _llama_trainer(tmp_path / "timed", "eager", regional=True, ste_attention_loss_weight=0.0)
    trainer.calibrate()
    stage, step = trainer.stage_callback.state.stage, trainer.state.global_step
    compiled, timings = [], []
    compile_as_for_training, time_step = time_budget.compiled_as_for_training, time_budget.time_distillation_step

    def keep(accelerator, model):
        compiled.append(compile_as_for_training(accelerator, model))
        return compiled[-1]

    def timed(trainer, phase):
        timings.append((phase, time_step(trainer, phase)))
        return timings[-1][1]

    monkeypatch.setattr(time_budget, "compiled_as_for_training", keep)
    monkeypatch.setattr(time_budget, "time_distillation_step", timed)
    budget = time_budget.steps_for_budget(trainer, time.time() + 1000.0, final_eval_s=0.0, stage_eval_s=0.0)
    assert [phase for phase, _ in timings] == [1, 3] and 0 < budget["timing_s"] < 1000.0 - budget["remaining_s"] + 1
    assert set(budget["step_s_by_kind"]) == {"attention_kl", "output_only"}
    assert _graphs() > 0 and all(t["first_step_s"] >= t["step_s"] > 0 for _, t in timings)
    layers = compiled[0].model.layers
    assert all(isinstance(layer, torch._dynamo.eval_frame.OptimizedModule) for layer in layers)
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in trainer.model.modules())
    assert all(p.grad is None for p in trainer.model.parameters())
    assert trainer.stage_callback.state.stage == stage and trainer.state.global_step == step
    trainer.train()
    assert _graphs() == graphs_of_training
    _fresh_dynamo()
