"""What each process of a data-parallel run holds at its end, for a run record (`results.json` of the recipes)."""

from __future__ import annotations

import hashlib

import torch


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and values, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def per_process(accelerator, value) -> list:
    """`value` of every process, in process order (collective: every process calls it)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def replica_weight_digests(trainer) -> list[str] | None:
    """The `weights_digest` of the trained model on every process, in process order (collective). Data parallelism
    (DDP) keeps one full copy per process, and the copies must be equal; under FSDP each process holds a shard, so
    there is nothing to compare: None."""
    if trainer.is_fsdp_enabled:
        return None
    return per_process(trainer.accelerator, weights_digest(trainer.accelerator.unwrap_model(trainer.model)))
