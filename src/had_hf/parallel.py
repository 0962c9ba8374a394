"""What distillation under several processes needs beside Accelerate: which parallelisms the trainer accepts, the
frozen teacher placed or sharded like the student, and the calibration deferred until the student is sharded."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback


class CalibrationAtTrainBegin(TrainerCallback):
    """Calibrates the trainer's student once training has prepared it (every process runs the same batches)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.calibrate()


def check_parallelism(trainer: Trainer) -> None:
    """Refuses the parallelisms whose sharding of the frozen teacher is not handled: DeepSpeed and FSDP version 1."""
    if trainer.is_deepspeed_enabled:
        raise ValueError(
            "HADDistillationTrainer supports single-device, data-parallel (DDP) and FSDP2 training; DeepSpeed is not "
            "supported (the frozen teacher is not sharded by it). Launch with `accelerate launch --num_processes N` "
            "and no DeepSpeed config, or with an FSDP2 config (recipes/accelerate_configs/fsdp2_2proc.yaml)."
        )
    fsdp_plugin = trainer.accelerator.state.fsdp_plugin if trainer.is_fsdp_enabled else None
    if fsdp_plugin is not None and getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "HADDistillationTrainer supports FSDP version 2 only (Accelerate's FSDP2 plugin, `fsdp_version: 2` in the "
            "accelerate config; see recipes/accelerate_configs/fsdp2_2proc.yaml), got FSDP version "
            f"{fsdp_plugin.fsdp_version}."
        )


def prepare_teacher(accelerator, teacher: torch.nn.Module) -> torch.nn.Module:
    """The frozen teacher on the training devices: sharded like the student under FSDP2 (its decoder/encoder layers
    each a `fully_shard` unit, so a teacher larger than one device fits), else placed whole on each device (no DDP
    wrapper: it is never trained). Its attention modules keep their names, so the capture store fills as before."""
    if accelerator.is_fsdp2:
        from accelerate.utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, teacher).eval()
    return accelerator.prepare_model(teacher, evaluation_mode=True)
