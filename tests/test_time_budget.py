"""The causal-LM recipe's time budget (`recipes.common.time_budget`): the steps that fit, and a timed step that runs
the student as training will (compiled, where the run compiles)."""

import types

import pytest
import torch

from recipes.common import time_budget
from tests.test_compile import _fresh_dynamo, _graphs, _llama_trainer


@pytest.mark.parametrize("torch_compile, compile_s, max_steps", [(False, 0.0, 881), (True, 10.0, 845)])
def test_the_budget_reserves_the_evaluations_saving_and_each_stages_compiling(
    monkeypatch, torch_compile, compile_s, max_steps
):
    """1,000 s left, steps of 1 s (the first 11 s), evaluations of no time: 30 s for saving, and compiled 4 x 10 s for
    the stages' compiling; the rest in steps of 1.1 s (a tenth for logging and the like)."""
    monkeypatch.setattr(time_budget, "time_distillation_step", lambda trainer: {"first_step_s": 11.0, "step_s": 1.0})
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(torch_compile=torch_compile))
    budget = time_budget.steps_for_budget(trainer, 1000.0, final_eval_s=0.0, stage_eval_s=0.0)
    assert budget["compile_s"] == compile_s and budget["max_steps"] == max_steps
    assert budget["reserve_s"] == 30.0 + 4 * compile_s


def test_the_timed_step_compiles_the_graphs_that_training_then_reuses(tmp_path, monkeypatch):
    """Regional compilation (dynamo alone): the timed step runs the student compiled layer by layer, the trainer's
    own model is left uncompiled, in its stage, without gradients, and the training that follows compiles no graph
    beyond those of the same training without the timed step. Both students are calibrated first, as the recipe
    calibrates before it times a step."""
    _fresh_dynamo()
    plain = _llama_trainer(tmp_path / "plain", "eager", regional=True)
    plain.calibrate()
    plain.train()
    graphs_of_training = _graphs()

    _fresh_dynamo()
    trainer = _llama_trainer(tmp_path / "timed", "eager", regional=True)
    trainer.calibrate()
    stage = trainer.stage_callback.state.stage
    compiled = []
    compile_as_for_training = time_budget.compiled_as_for_training

    def keep(accelerator, model):
        compiled.append(compile_as_for_training(accelerator, model))
        return compiled[-1]

    monkeypatch.setattr(time_budget, "compiled_as_for_training", keep)
    timing = time_budget.time_distillation_step(trainer)
    graphs_of_timing = _graphs()
    assert graphs_of_timing > 0 and timing["first_step_s"] >= timing["step_s"] > 0
    layers = compiled[0].model.layers
    assert all(isinstance(layer, torch._dynamo.eval_frame.OptimizedModule) for layer in layers)
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in trainer.model.modules())
    assert all(p.grad is None for p in trainer.model.parameters()) and trainer.stage_callback.state.stage == stage
    trainer.train()
    assert _graphs() == graphs_of_training
    _fresh_dynamo()
