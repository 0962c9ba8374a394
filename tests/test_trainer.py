"""The distillation trainer on a tiny BERT: stages, logging, learning rate, resume, data parallel."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from had_hf import HADConfig, HADDistillationTrainer, HADTrainingArguments
from had_hf.state import runtime_state
from tests.conftest import build_model


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, size=48, length=10, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 99, (size, length), generator=generator)
        self.mask = torch.ones(size, length, dtype=torch.long)
        for i in range(size):
            self.mask[i, length - int(torch.randint(0, 5, (1,), generator=generator)) :] = 0
        self.labels = torch.randint(0, 2, (size,), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=16,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        refinement_learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=7,
        data_seed=7,
        calibration_batches=3,
        calibration_batch_size=4,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return HADTrainingArguments(**kwargs)


def _trainer(tmp_path, **overrides):
    teacher = build_model("bert", seed=0)
    student = build_model("bert", seed=0)
    return HADDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, **overrides),
        had_config=HADConfig(top_n=3),
        train_dataset=TinyDataset(),
    )


def test_args_defaults_follow_the_paper():
    args = HADTrainingArguments(output_dir="x", report_to="none")
    assert args.learning_rate == 2e-5 and args.per_device_train_batch_size == 16 and args.max_grad_norm == 0.5
    assert args.max_steps == args.schedule().total == 29209
    assert args.schedule().timeline()[1]["start_step"] == 3219
    with pytest.raises(ValueError, match="c_start > c_switch > c_end"):
        HADTrainingArguments(output_dir="x", c_switch=0.01, report_to="none")


def test_four_stages_in_log_history(tmp_path):
    trainer = _trainer(tmp_path)
    schedule = trainer.schedule
    assert (schedule.stage1_end, schedule.stage2_end, schedule.stage3_end, schedule.total) == (2, 6, 11, 16)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss_out" in entry]
    assert [entry["step"] for entry in logs] == list(range(1, 17))
    by_step = {entry["step"]: entry for entry in logs}
    # step k logs the update made at step k - 1 (0-based)
    for step, entry in by_step.items():
        assert entry["stage"] == schedule.phase(step - 1)
        assert entry["c"] == pytest.approx(max(5.0 * schedule.gamma ** (step - 1), 0.05))
    assert [by_step[s]["stage"] for s in (2, 3, 6, 7, 11, 12)] == [1, 2, 2, 3, 3, 4]
    cs = [by_step[s]["c"] for s in range(1, 8)]
    assert all(a > b for a, b in zip(cs, cs[1:6])) and cs[6] == 0.05
    assert all(by_step[s]["loss_attn"] > 0 for s in range(1, 12))
    assert all(by_step[s]["loss_attn"] == 0 for s in range(12, 17))
    assert all(by_step[s]["learning_rate"] == pytest.approx(1e-3) for s in range(1, 12))
    assert all(by_step[s]["learning_rate"] == pytest.approx(1e-4) for s in range(12, 17))
    assert trainer.had_config.is_calibrated
    assert runtime_state(trainer.model).stage == "inference"  # ready for inference after training
    assert "stage" not in trainer.had_config.to_dict()  # the training stage is runtime state, never saved
    evals = [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evals == []  # no eval dataset: nothing to evaluate at the stage ends


def test_the_bound_attention_modules_are_found_once_per_model(tmp_path, monkeypatch):
    """The capture stores bind the same modules at every step, found by one walk per model (teacher and student), and
    they are all of each model's attention layers."""
    import had_hf.trainer as trainer_module
    from had_hf.capture import bound_modules

    walks = []

    def counted(model):
        walks.append(model)
        return bound_modules(model)

    monkeypatch.setattr(trainer_module, "bound_modules", counted)
    trainer = _trainer(tmp_path, max_steps=5)
    trainer.train()
    assert len(walks) == 2 and walks[0] is trainer.teacher and walks[1] is trainer.model
    for model in walks:
        names = [module._had_name for module in trainer.bound_modules(model)]
        assert len(names) == model.config.num_hidden_layers == len(set(names))


def test_the_flop_count_counts_parameters_once_and_matches_transformers_estimate(tmp_path, monkeypatch):
    """total_flos is transformers' estimate (6 x input tokens x non-embedding parameters per step), with the
    parameters counted once for the run instead of at every step."""
    trainer = _trainer(tmp_path, max_steps=5)
    parameters = trainer.model.num_parameters(exclude_embeddings=True)
    counts = []
    original = type(trainer.model).num_parameters

    def counted(model, *args, **kwargs):
        counts.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(type(trainer.model), "num_parameters", counted)
    trainer.train()
    batch = TinyDataset().ids[:4]
    assert trainer.state.total_flos == 5 * 6 * batch.numel() * parameters
    assert counts == [trainer.model]


@pytest.mark.parametrize("max_steps", [None, 4, 97, 5000, 40000])
@pytest.mark.parametrize(
    ("ste_steps", "refinement_steps"), [(10_000, 10_000), (0, 10_000), (10_000, 0), (0, 0), (3, 1)]
)
def test_schedule_keeps_zero_length_stages_and_every_other_stage(max_steps, ste_steps, refinement_steps):
    """A stage asked for with 0 steps has 0 steps, stretched or not; every other stage keeps at least one step, and
    the stretched schedule totals max_steps."""
    from had_hf.schedule import StageSchedule

    schedule = StageSchedule.build(ste_steps=ste_steps, refinement_steps=refinement_steps, max_steps=max_steps)
    lengths = {entry["stage"]: entry["end_step"] - entry["start_step"] for entry in schedule.timeline()}
    assert schedule.total == (max_steps or 9209 + ste_steps + refinement_steps)
    assert lengths["tanh"] >= 1 and lengths["sign"] >= 1
    assert (lengths["ste"] == 0) == (ste_steps == 0) and (lengths["refinement"] == 0) == (refinement_steps == 0)
    assert sum(lengths.values()) == schedule.total
    if max_steps and max_steps >= 97:  # long enough for the proportions to show: within rounding of the scale (the
        # refinement stage takes the few steps by which the scaled c decay's stage ends round away)
        slack = 2 + 1e-4 * max_steps
        assert lengths["ste"] == pytest.approx(ste_steps * schedule.scale, abs=slack)
        assert lengths["refinement"] == pytest.approx(refinement_steps * schedule.scale, abs=slack)


def test_no_refinement_stage_trains_without_one(tmp_path):
    trainer = _trainer(tmp_path, refinement_steps=0, max_steps=8)
    assert trainer.schedule.stage3_end == trainer.schedule.total == 8
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss_out" in entry]
    assert len(logs) == 8 and {entry["stage"] for entry in logs} == {1, 2, 3}
    assert all(entry["learning_rate"] == pytest.approx(1e-3) for entry in logs)  # never the refinement rate


def test_sigma_per_head_lever_calibrates_and_trains_per_head(tmp_path):
    trainer = _trainer(tmp_path, sigma_per_head=True, max_steps=4)
    trainer.train()
    heads = trainer.model.config.num_attention_heads
    assert trainer.had_config.sigma_per_head
    assert all(len(values) == heads for values in trainer.had_config.sigma_q.values())
    assert len({round(v, 6) for v in next(iter(trainer.had_config.sigma_q.values()))}) > 1  # heads differ
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_ablations_switch_the_attention_loss_and_tanh(tmp_path):
    trainer = _trainer(tmp_path, attention_loss=False, skip_tanh=True, max_steps=8)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss_out" in entry]
    assert all(entry["loss_attn"] == 0 for entry in logs)
    assert {trainer.schedule.stage(s) for s in range(trainer.schedule.stage3_end)} == {"ste"}
    assert trainer.schedule.stage(trainer.schedule.stage3_end) == "refinement"


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
            control.should_save = True


def test_resume_mid_stage_two_ends_with_identical_weights(tmp_path):
    uninterrupted = _trainer(tmp_path / "a")
    uninterrupted.train()
    expected = {k: v.clone() for k, v in uninterrupted.model.state_dict().items()}

    first = _trainer(tmp_path / "b", save_strategy="steps", save_steps=100)
    first.add_callback(_StopAt(4))  # stage 2 runs over steps 2..5
    first.train()
    assert first.state.global_step == 4 and first.schedule.phase(4) == 2
    checkpoint = tmp_path / "b" / "checkpoint-4"
    assert (checkpoint / "model.safetensors").is_file()

    resumed = _trainer(tmp_path / "b", save_strategy="no")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 16
    assert resumed.had_config.sigma_q == uninterrupted.had_config.sigma_q
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_had_config_ste_clip_that_the_training_arguments_override_is_reported(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="had_hf.trainer"):
        trainer = HADDistillationTrainer(
            model=build_model("bert", seed=0),
            teacher_model=build_model("bert", seed=0),
            args=_args(tmp_path),
            had_config=HADConfig(top_n=3, ste_clip=2.0),
            train_dataset=TinyDataset(),
        )
    assert trainer.had_config.ste_clip == 1.0
    assert "ste_clip=2.0 is replaced by the training argument ste_clip=1.0" in caplog.text


def _tiny_t5(seed):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=37, num_layers=1, num_decoder_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    return T5ForConditionalGeneration(config)


def test_seq2seq_student_distills_from_labels_with_the_decoders_own_mask(tmp_path):
    from had_hf.capture import forward_inputs
    from had_hf.losses import query_mask

    # a seq2seq batch has labels, not decoder inputs: they are built from the labels before the labels are dropped
    labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    encoder_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    inputs = forward_inputs(_tiny_t5(0), {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": encoder_mask,
                                          "labels": labels})  # fmt: skip
    assert "labels" not in inputs
    assert inputs["decoder_input_ids"].tolist() == [[0, 5, 6, 7], [0, 8, 9, 0]]  # shifted right, -100 -> pad
    assert inputs["decoder_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    # decoder queries take the decoder's mask, encoder queries the encoder's, even when both have the same length
    assert torch.equal(query_mask(inputs, decoder=True), inputs["decoder_attention_mask"])
    assert torch.equal(query_mask(inputs, decoder=False), encoder_mask)
    assert query_mask({"attention_mask": encoder_mask}, decoder=True) is None

    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(3, 99, (8,), generator=generator), "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.randint(3, 99, (5,), generator=generator)} for _ in range(16)]  # fmt: skip
    trainer = HADDistillationTrainer(
        model=_tiny_t5(0),
        teacher_model=_tiny_t5(0),
        args=_args(tmp_path, max_steps=6, calibration_batches=2),
        had_config=HADConfig(top_n=3),
        train_dataset=data,
    )
    trainer.train()
    sigma_q = trainer.had_config.sigma_q
    assert {"decoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.1.EncDecAttention"} <= set(sigma_q)
    losses = [(entry["loss_out"], entry["loss_attn"]) for entry in trainer.state.log_history if "loss_attn" in entry]
    assert len(losses) == 6 and all(math.isfinite(a) and math.isfinite(b) for a, b in losses)
    assert any(b > 0 for _, b in losses)  # the attention loss reached the student


def test_deepspeed_or_reentrant_checkpointing_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="use_reentrant"):
        _trainer(
            tmp_path,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": True},
        )
    with pytest.raises(ValueError, match="not a HAD model"):
        HADDistillationTrainer(model=build_model("bert"), teacher_model=build_model("bert"), args=_args(tmp_path))


DDP_SCRIPT = r"""
import hashlib, os, sys, torch
sys.path.insert(0, os.environ["REPO_ROOT"])
from tests.test_trainer import _trainer
from pathlib import Path
trainer = _trainer(Path(sys.argv[1]), max_steps=6, ddp_backend="gloo")
trainer.train()
digest = hashlib.sha256()
for name, tensor in sorted(trainer.accelerator.unwrap_model(trainer.model).state_dict().items()):
    digest.update(tensor.detach().cpu().numpy().tobytes())
rank = int(os.environ.get("RANK", 0))
Path(sys.argv[1], f"rank{rank}.sha").write_text(digest.hexdigest() + " " + str(trainer.args.world_size))
from recipes.common.run_record import end_run
end_run(trainer)  # the recipes' last step: the processes leave the group and exit without the interpreter's teardown
"""


@pytest.mark.slow
def test_two_process_data_parallel_ends_with_identical_weights(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, REPO_ROOT=str(repo), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=repo,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = (tmp_path / "rank0.sha").read_text().split()
    rank1 = (tmp_path / "rank1.sha").read_text().split()
    assert rank0[1] == rank1[1] == "2"
    assert rank0[0] == rank1[0]
