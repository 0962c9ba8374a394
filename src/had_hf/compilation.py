"""What a distillation run under `torch.compile` (`TrainingArguments(torch_compile=True)`) needs beside Accelerate.

The Trainer's Accelerator compiles the student and the teacher (`accelerator.prepare_model`). What keeps the compiled
code valid across the run lives with the code it concerns: c reaches the graph as a tensor (`had_hf.state`), and the
teacher's capture store is the same in every stage (`HADDistillationTrainer.compute_loss`). Here: that the run's own
arguments choose the compilation, the inputs' shapes traced as dynamic from the first step, and room for the graphs
of one run.
"""

from __future__ import annotations

import logging

import torch

from .state import TRAINING_STAGES

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 4 * (len(TRAINING_STAGES) + 1)
"""Graphs that one compiled distillation run may add to the forward of a model class (dynamo's `recompile_limit`
counts them per code object, and teacher and student share theirs): one for the teacher and one per training stage,
each possibly traced again when the batch shape first changes (then with dynamic shapes), and room for as many again
(a peft student's teacher passes, the first-forward check of a student calibrated before training)."""


def use_own_compile_settings(args) -> None:
    """Lets `args` choose the compilation of the Accelerator that a Trainer is about to create.

    Accelerate keeps one process-wide `AcceleratorState`, whose compile settings (`dynamo_plugin`) are those of the
    first Accelerator created after the last reset; `TrainingArguments` resets it when it first sets up its device.
    A Trainer created after another one whose arguments are newer (a recipe's teacher fine-tuning) would therefore
    take that Trainer's settings, and `torch_compile=True` would silently compile nothing. The state is reset (the
    process group and device, in `PartialState`, are kept) when its settings differ from those of `args`.
    """
    from accelerate.state import AcceleratorState

    plugin = AcceleratorState._shared_state.get("dynamo_plugin")
    if plugin is None:
        return
    wanted = (args.torch_compile_backend or "inductor").upper() if args.torch_compile else "NO"
    mode = args.torch_compile_mode or "default"
    if plugin.backend.value != wanted or (args.torch_compile and (plugin.mode or "default") != mode):
        logger.info("Accelerate's state was set up without this run's compile settings: setting it up again.")
        AcceleratorState._reset_state()


def use_regional_compilation(accelerator, enabled: bool) -> None:
    """Makes `accelerator` compile the models it prepares regionally (`enabled`) or whole.

    `TrainingArguments` builds Accelerate's `TorchDynamoPlugin` without this choice, which the plugin then reads from
    the environment (`ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION`, set by `accelerate launch`); the run's own
    argument decides instead. Regional compilation (`accelerate.utils.compile_regions`) compiles each repeated block
    (a decoder layer) on its own, and HAD attention keeps every layer's own values out of the graph (the capture store
    is bound to the modules: `HADCaptureStore.bound`), so all layers of a model share one graph.
    """
    plugin = accelerator.state.dynamo_plugin
    if enabled and not hasattr(plugin, "use_regional_compilation"):
        raise ValueError(
            "use_regional_compilation needs an accelerate version with regional compilation (TorchDynamoPlugin's "
            "use_regional_compilation): upgrade accelerate, or leave use_regional_compilation off."
        )
    if hasattr(plugin, "use_regional_compilation"):
        plugin.use_regional_compilation = enabled


def run_recompile_limit():
    """A context in which dynamo's per-function recompile limit is at least `RECOMPILE_LIMIT` (never lowered).

    Past the limit dynamo runs the function eagerly from then on, with one warning: a long run would silently lose
    its compilation at a late stage.
    """
    return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT))


def mark_shapes_dynamic(inputs: dict, lengths: bool = True) -> None:
    """Marks the batch dimension of every tensor in `inputs`, and with `lengths` the token dimension of the 2-D ones
    (token ids, masks, labels), as dynamic for `torch.compile` (`torch._dynamo.maybe_mark_dynamic`, which leaves a
    dimension that the code needs fixed specialized).

    A distillation run sees batches of many lengths (each padded to its longest) and a shorter last batch per epoch.
    Left to dynamo, each compiled model is first traced for the first batch's shape and traced again, with dynamic
    shapes, at the first different one: the teacher's graph and the first stage's twice each, and the graphs of the
    stage where the first epoch ends once more. Marked from the first step, each model traces one graph per stage.
    """
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            _mark_dynamic(value, (0, 1) if lengths and value.dim() == 2 else (0,))


def mark_scores_dynamic(store, lengths: bool = True) -> None:
    """Marks the batch dimension of the queries, keys and position biases that the teacher recorded in `store` (a
    `HADCaptureStore`), and with `lengths` their positions' dimensions, as dynamic, as `mark_shapes_dynamic` does for
    the inputs: the student's compiled attention reads them through its modules, and a length fixed there would fix
    the inputs' length too."""
    qk_dims, bias_dims = ((0, 2), (0, -2, -1)) if lengths else ((0,), (0,))
    for scores in store.scores.values():
        _mark_dynamic(scores.query, qk_dims)
        _mark_dynamic(scores.key, qk_dims)
        if scores.position_bias is not None:
            _mark_dynamic(scores.position_bias, bias_dims)


def _mark_dynamic(tensor: torch.Tensor, dims: tuple[int, ...]) -> None:
    for dim in dims:
        torch._dynamo.maybe_mark_dynamic(tensor, dim % tensor.dim())
