"""FSDP2 (Accelerate's plugin) for student and teacher, on 2 CPU processes (gloo) and on 2 GPUs: the attention maps
are captured inside the sharded layers, and the run is the single-process run of the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

FSDP_SCRIPT = r"""
import json, os, sys, torch
sys.path.insert(0, os.environ["REPO_ROOT"])
from pathlib import Path
from torch.distributed.fsdp import FSDPModule
from had_hf import HADConfig, HADDistillationTrainer
from tests.conftest import build_model
from tests.fsdp_cpu import force_fsdp2_on_cpu
from tests.test_trainer import TinyDataset, _args

# mode: "cpu-fsdp" (torchrun on CPUs: Accelerate's state forced to FSDP2), "launched" (accelerate launch with an FSDP2
# config, on GPUs), "single" (one process)
out, mode, precision = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
world_size = int(os.environ.get("WORLD_SIZE", "1"))
args = _args(
    out, max_steps=6, per_device_train_batch_size=4 // world_size, bf16=precision == "bf16",
    use_cpu=not torch.cuda.is_available(),
)
args.device  # sets up the process group (TrainingArguments reset Accelerate's state here)
if mode == "cpu-fsdp":
    force_fsdp2_on_cpu(mixed_precision=precision)
data = TinyDataset(size=24)
data.mask[:] = 1  # no padding: the mean of the ranks' losses is then the loss of their joint batch
trainer = HADDistillationTrainer(
    model=build_model("llama", seed=0), teacher_model=build_model("llama", seed=0), args=args,
    had_config=HADConfig(top_n=3), train_dataset=data,
)
trainer.train()
trainer.save_model()  # under FSDP: the full state dict gathered from the shards, written by rank 0
logs = [entry for entry in trainer.state.log_history if "loss_attn" in entry]
record = {
    "sharded": [isinstance(trainer.model, FSDPModule), isinstance(trainer.teacher, FSDPModule)],
    "world_size": trainer.args.world_size,
    "loss": [entry["loss"] for entry in logs],
    "loss_attn": [entry["loss_attn"] for entry in logs],
    "stage": [entry["stage"] for entry in logs],
}
Path(out, f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))
from recipes.common.run_record import end_run
end_run(trainer)  # the recipes' last step: the processes leave the group and exit without the interpreter's teardown
"""


CPU_FSDP = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547"]
GPU_FSDP = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "recipes" / "accelerate_configs" / "fsdp2_2proc.yaml"), "--main_process_port", "29548"]  # fmt: skip


def _run(tmp_path, name, launcher, mode, precision="no"):
    script = tmp_path / "fsdp_run.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / name
    env = dict(os.environ, REPO_ROOT=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [*launcher, str(script), str(out), mode, precision]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    return out, records


def _assert_fsdp_run_is_the_single_run(tmp_path, launcher, mode, atol):
    from safetensors.torch import load_file

    from tests.conftest import build_model

    fsdp_out, fsdp_records = _run(tmp_path, "fsdp", launcher, mode)
    single_out, (single,) = _run(tmp_path, "single", [sys.executable], "single")
    assert len(fsdp_records) == 2
    for record in fsdp_records:
        assert record["sharded"] == [True, True] and record["world_size"] == 2
        assert any(value > 0 for value in record["loss_attn"])  # the sharded layers' attention maps were captured
    assert single["sharded"] == [False, False]
    # the logged losses are means over the ranks, each rank's over its half of the joint batch
    for name in ("loss", "loss_attn"):
        assert fsdp_records[0][name] == fsdp_records[1][name]
        assert fsdp_records[0][name] == pytest.approx(single[name], rel=1e-3, abs=1e-12)

    gathered, reference = load_file(fsdp_out / "model.safetensors"), load_file(single_out / "model.safetensors")
    initial = build_model("llama", seed=0).state_dict()
    assert sorted(gathered) == sorted(reference)
    moved = max((reference[name] - initial[name]).abs().max().item() for name in reference)
    assert moved > max(1e-3, 10 * atol)  # training changed the weights far more than the tolerance below
    for name in reference:
        torch.testing.assert_close(gathered[name], reference[name], rtol=0, atol=atol, msg=name)


@pytest.mark.slow
def test_fsdp2_distillation_matches_one_process_on_the_joint_batch(tmp_path):
    _assert_fsdp_run_is_the_single_run(tmp_path, CPU_FSDP, "cpu-fsdp", atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp2_on_two_gpus_matches_one_gpu(tmp_path):
    """The GPU path itself: `accelerate launch` with recipes/accelerate_configs/fsdp2_2proc.yaml (NCCL)."""
    _assert_fsdp_run_is_the_single_run(tmp_path, GPU_FSDP, "launched", atol=1e-4)


@pytest.mark.slow
def test_fsdp2_mixed_precision_keeps_the_capture_store(tmp_path):
    # FSDP2 casts the forward kwargs of every sharded layer under mixed precision (rebuilding dataclasses and
    # dicts): the store must reach the attention functions as the object the trainer reads
    _, records = _run(tmp_path, "bf16", CPU_FSDP, "cpu-fsdp", precision="bf16")
    for record in records:
        assert record["sharded"] == [True, True]
        attention_stages = [loss for loss, stage in zip(record["loss_attn"], record["stage"]) if stage <= 3]
        assert attention_stages and all(0 < loss < 1 for loss in attention_stages)


def test_fsdp_version_1_is_refused_clearly(tmp_path):
    from accelerate.state import AcceleratorState

    from had_hf import HADConfig, HADDistillationTrainer
    from tests.conftest import build_model
    from tests.fsdp_cpu import force_fsdp2_on_cpu
    from tests.test_trainer import TinyDataset, _args

    args = _args(tmp_path)
    assert args.device.type == "cpu"  # sets up the device (TrainingArguments reset Accelerate's state here)
    try:
        force_fsdp2_on_cpu().fsdp_plugin.fsdp_version = 1
        with pytest.raises(ValueError, match="FSDP version 2 only .* got FSDP version 1"):
            HADDistillationTrainer(
                model=build_model("llama"),
                teacher_model=build_model("llama"),
                args=args,
                had_config=HADConfig(top_n=3),
                train_dataset=TinyDataset(),
            )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
