"""Stage-end evaluations of the distillation trainer: the deployable model beside the training-time one, keeping the
best deployable stage end, and re-calibrating sigma when the forward becomes exactly binary."""

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, TrainerCallback

from had_hf import HADConfig, HADDistillationTrainer
from had_hf.calibration import calibrate
from had_hf.callbacks import BestDeployableCallback
from tests.conftest import build_model
from tests.test_trainer import TinyDataset, _args


def _logit_metrics(prediction):
    """Metrics that move with every logit: equal values mean the same predictions, to float precision."""
    logits = np.asarray(prediction.predictions, dtype=np.float64)
    return {"logit_mean": float(logits.mean()), "margin": float((logits[:, 1] - logits[:, 0]).mean())}


def _trainer(tmp_path, callbacks=None, **overrides):
    teacher = build_model("bert", seed=0)
    student = build_model("bert", seed=0)
    return HADDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, **overrides),
        had_config=HADConfig(top_n=3),
        train_dataset=TinyDataset(),
        eval_dataset=TinyDataset(size=24, seed=1),
        compute_metrics=_logit_metrics,
        callbacks=callbacks,
    )


def _entries(trainer, key):
    return [(entry["step"], entry[key]) for entry in trainer.state.log_history if key in entry]


def test_every_stage_end_is_evaluated_once_in_its_stage_and_as_deployed(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.train()
    ends = sorted(trainer.schedule.stage_ends())
    assert ends == [2, 6, 11, 16]
    assert [step for step, _ in _entries(trainer, "eval_margin")] == ends
    assert [step for step, _ in _entries(trainer, "deployable_margin")] == ends
    training, deployable = dict(_entries(trainer, "eval_margin")), dict(_entries(trainer, "deployable_margin"))
    # at the end of the tanh stage (c = 1) the stage's own forward is not the binary one
    assert training[2] != pytest.approx(deployable[2], abs=1e-7)
    # the refinement stage's forward is the binary one: both evaluations agree at its end
    assert training[16] == pytest.approx(deployable[16], abs=1e-6)


def test_the_deployable_evaluation_is_the_saved_and_reloaded_students(tmp_path):
    trainer = _trainer(tmp_path / "run")
    trainer.train()
    final = dict(_entries(trainer, "deployable_logit_mean"))[16], dict(_entries(trainer, "deployable_margin"))[16]
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved")).eval()
    data = TinyDataset(size=24, seed=1)
    with torch.no_grad():
        logits = reloaded(input_ids=data.ids, attention_mask=data.mask).logits.double()
    assert final[0] == pytest.approx(logits.mean().item(), abs=1e-6)
    assert final[1] == pytest.approx((logits[:, 1] - logits[:, 0]).mean().item(), abs=1e-6)
    # and the same method called by hand after training gives it too
    assert trainer.evaluate_deployable()["deployable_margin"] == pytest.approx(final[1], abs=1e-6)


@pytest.mark.parametrize("greater_is_better", [True, False])
def test_keep_best_deployable_restores_the_best_stage_end(tmp_path, greater_is_better):
    trainer = _trainer(tmp_path)
    keeper = BestDeployableCallback("deployable_margin", trainer.had_config, greater_is_better=greater_is_better)
    trainer.add_callback(keeper)
    trainer.train()
    print("kept step", keeper.best_step)
    values = dict(_entries(trainer, "deployable_margin"))
    best_step = (max if greater_is_better else min)(values, key=values.get)
    assert keeper.best_step == best_step and keeper.best == values[best_step]
    assert keeper.restored == (best_step != 16)
    # the trained student is now the kept one: its deployable evaluation is the best stage end's
    assert trainer.evaluate_deployable()["deployable_margin"] == pytest.approx(values[best_step], abs=1e-6)


def test_recalibrate_sigma_measures_the_student_where_the_ste_stage_starts(tmp_path):
    seen = {}

    class Probe(TrainerCallback):
        """Runs after the stage callback: at the first STE step, sigma is already re-calibrated."""

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            config = model.config.quantization_config
            if state.global_step in (5, 6):
                seen[state.global_step] = (dict(config.sigma_q), dict(config.sigma_k))
            if state.global_step == 6:  # the reference: the same calibration batches on a copy of the student
                reference = copy.deepcopy(model)
                generator = torch.Generator().manual_seed(args.seed)
                loader = torch.utils.data.DataLoader(
                    TinyDataset(), batch_size=args.calibration_batch_size, shuffle=True, generator=generator
                )
                seen["reference"] = calibrate(reference, loader, num_batches=args.calibration_batches)

    trainer = _trainer(tmp_path, callbacks=[Probe()], recalibrate_sigma=True)
    assert trainer.schedule.stage2_end == 6
    trainer.train()
    before, after, reference = seen[5], seen[6], seen["reference"]
    assert after[0] != before[0] and after[1] != before[1]
    for name in after[0]:
        assert after[0][name] == pytest.approx(reference.sigma_q[name], rel=1e-6)
        assert after[1][name] == pytest.approx(reference.sigma_k[name], rel=1e-6)
    assert trainer.had_config.sigma_q == after[0]  # no later stage changes it


def test_without_recalibrate_sigma_sigma_stays_as_first_calibrated(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.calibrate()
    first = dict(trainer.had_config.sigma_q)
    trainer.train()
    assert trainer.had_config.sigma_q == first


def test_ste_learning_rate_sets_stage_3_only(tmp_path):
    seen = {}

    class Rates(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen[state.global_step] = optimizer.param_groups[0]["lr"]

    trainer = _trainer(tmp_path, callbacks=[Rates()], ste_learning_rate=3e-4)
    trainer.train()
    logged = {entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "loss_out" in entry}
    # step k is the update of phase(k - 1): phases 1-2 at the optimizer's rate, 3 at the STE rate, 4 at refinement's
    for step in range(1, 17):
        expected = {1: 1e-3, 2: 1e-3, 3: 3e-4, 4: 1e-4}[trainer.schedule.phase(step - 1)]
        assert seen[step] == pytest.approx(expected) and logged[step] == pytest.approx(expected)
    with pytest.raises(ValueError, match="ste_learning_rate"):
        _args(tmp_path, ste_learning_rate=0.0)


def test_ste_attention_loss_weight_sets_stage_3_only(tmp_path):
    trainer = _trainer(tmp_path, ste_attention_loss_weight=0.0, refinement_attention_loss_weight=0.5)
    trainer.train()
    logged = {entry["step"]: entry["loss_attn"] for entry in trainer.state.log_history if "loss_attn" in entry}
    assert sorted(logged) == list(range(1, 17))
    for step, loss_attn in logged.items():
        phase = trainer.schedule.phase(step - 1)
        assert trainer.attention_loss_weight(step - 1) == {1: 1.0, 2: 1.0, 3: 0.0, 4: 0.5}[phase]
        # the attention KL is computed (and logged) only in the stages that train on it
        assert (loss_attn == 0.0) == (phase == 3), (step, phase, loss_attn)
    unset = _trainer(tmp_path / "unset", attention_loss_weight=2.0)
    assert [unset.attention_loss_weight(step) for step in (0, 7, 12)] == [2.0, 2.0, 0.0]  # phases 1, 3, 4
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="ste_attention_loss_weight must be a finite number >= 0"):
            _args(tmp_path, ste_attention_loss_weight=bad)


def test_a_peft_student_is_recalibrated_with_its_adapter_on(tmp_path):
    pytest.importorskip("peft")
    from had_hf.peft_student import make_peft_student

    student = make_peft_student(build_model("bert", seed=0), HADConfig(top_n=3), lora_r=4, lora_dropout=0.0)
    trainer = HADDistillationTrainer(model=student, args=_args(tmp_path, max_steps=8), train_dataset=TinyDataset())
    trainer.calibrate()
    on_teacher = dict(trainer.had_config.sigma_q)
    with torch.no_grad():  # an adapter that moves the queries: the student's sigma differs from the teacher's
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    trainer.calibrate(on_student=True)
    generator = torch.Generator().manual_seed(trainer.args.seed)
    loader = torch.utils.data.DataLoader(TinyDataset(), batch_size=4, shuffle=True, generator=generator)
    reference = calibrate(
        copy.deepcopy(student.get_base_model()), loader, num_batches=trainer.args.calibration_batches
    )
    assert trainer.had_config.sigma_q != on_teacher
    for name, value in reference.sigma_q.items():
        assert trainer.had_config.sigma_q[name] == pytest.approx(value, rel=1e-6)
