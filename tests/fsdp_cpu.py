"""FSDP2 on CPU processes (gloo), for the tests: Accelerate keeps an FSDP config only for GPU-type processes.

With `use_cpu` Accelerate's state is `MULTI_CPU` and its FSDP plugin is dropped (`AcceleratorState` switches to FSDP
only from `MULTI_GPU` and the other accelerator types), so `accelerate launch` with an FSDP config trains a CPU run
with DDP. torch's `fully_shard` itself works on CPU tensors over gloo: `force_fsdp2_on_cpu` puts Accelerate's shared
state into FSDP2, so that a Trainer built afterwards takes the same FSDP2 path as on GPUs (the student prepared by
`Accelerator.prepare`, the teacher by `had_hf.parallel.prepare_teacher`, a full state dict gathered to save).
"""

from __future__ import annotations


def force_fsdp2_on_cpu(mixed_precision: str = "no", **plugin_kwargs):
    """Switches this process's Accelerate state to FSDP2. Call it after the `TrainingArguments` have set up their
    device (`args.device`: they reset Accelerate's state) and before the Trainer is built."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = Accelerator(cpu=True, mixed_precision=mixed_precision).state
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="FULL_STATE_DICT",
        **plugin_kwargs,
    )
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return state
