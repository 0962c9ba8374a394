"""The time budget of a distillation run (`--time_budget_s` of the causal-LM recipe): how many steps fit, from timed
steps of the trainer as it will train, compiled where the run compiles."""

from __future__ import annotations

import logging
import time

import torch
from transformers import default_data_collator

from had_hf.compilation import run_recompile_limit
from had_hf.state import TRAINING_STAGES, runtime_state

logger = logging.getLogger(__name__)

COMPILING_STAGES = len(TRAINING_STAGES)
"""Stages whose first step compiles the student again under `torch_compile` (the stage is one of its graph's guards);
those of the timed steps find their graphs compiled."""


def steps_for_budget(trainer, deadline: float, final_eval_s: float, stage_eval_s: float, clock=time.time) -> dict:
    """max_steps that fit before `deadline` (a `clock()` time), after the timed steps, and reserving the final
    evaluation, four stage-end evaluations, saving, and under `torch_compile` the compiling of each stage that no timed
    step compiled. A step's time is timed in the first stage with the attention KL and in the first without it (where
    the run has both: the stages without it skip the KL's chunks), and weighed by the share of the schedule's steps
    each kind takes. A stage's compiling is the last timed kind's first step over its others (the first kind's also
    compiled the teacher)."""
    kinds = step_kinds(trainer)
    started = clock()
    timings = {kind: time_distillation_step(trainer, kind_of["phase"]) for kind, kind_of in kinds.items()}
    remaining_s = deadline - clock()
    last = timings[list(kinds)[-1]]
    compile_s = max(last["first_step_s"] - last["step_s"], 0.0) if trainer.args.torch_compile else 0.0
    step_s = sum(kinds[kind]["share"] * timing["step_s"] for kind, timing in timings.items())
    untimed_stages = COMPILING_STAGES - len(timings)
    reserve_s = 1.15 * final_eval_s + 4 * stage_eval_s + 30.0 + untimed_stages * compile_s
    steps = int((remaining_s - reserve_s) / (1.1 * step_s))
    if steps < 8:
        logger.warning("The time budget leaves room for %d steps; running the minimum of 8.", steps)
        steps = 8
    logger.info("Time budget: %.0f s left after the timed steps, %.3f s per step, %.0f s reserved (%.0f s compiling "
                "for each of %d stages): max_steps %d.", remaining_s, step_s, reserve_s, compile_s, untimed_stages,
                steps)  # fmt: skip
    return {"remaining_s": round(remaining_s, 1), "timing_s": round(clock() - started, 1), "step_s": round(step_s, 4),
            "compile_s": round(compile_s, 1), "reserve_s": round(reserve_s, 1), "max_steps": steps,
            "step_s_by_kind": {kind: round(timing["step_s"], 4) for kind, timing in timings.items()},
            "share_by_kind": {kind: round(kind_of["share"], 4) for kind, kind_of in kinds.items()}}  # fmt: skip


def step_kinds(trainer) -> dict[str, dict]:
    """The kinds of step in the trainer's schedule, in the order they first come: {"attention_kl" or "output_only":
    {"phase": the first phase (1-4) of that kind, "share": the share of the schedule's steps of that kind}}."""
    weights = trainer.args.stage_attention_loss_weights()
    schedule = trainer.schedule
    kinds = {}
    for entry in schedule.timeline():
        steps = entry["end_step"] - entry["start_step"]
        if steps > 0:
            kind = "attention_kl" if weights[entry["phase"] - 1] > 0 else "output_only"
            kinds.setdefault(kind, {"phase": entry["phase"], "share": 0.0})["share"] += steps / schedule.total
    return kinds


def time_distillation_step(trainer, phase: int = 1, repeats: int = 3) -> dict:
    """Seconds of one training step (forward of both models, both losses, backward) at the first step of `phase`
    (1-4) of the trainer's schedule, in that phase's stage and with its attention-loss weight: `first_step_s` (the
    first, which compiles), `step_s` (the fastest of the others). Under `torch_compile` the step runs on the student
    compiled as the Accelerator will compile it for training (whole or by regions), whose graphs the training then
    finds in dynamo's cache. The gradients are dropped and the student's stage and the trainer's step restored."""
    model = trainer.model
    state = runtime_state(model.get_base_model() if trainer.is_peft_student else model)
    saved_stage, saved_c, saved_step = state.stage, state.c, trainer.state.global_step
    step = trainer.schedule.timeline()[phase - 1]["start_step"]
    state.set(trainer.schedule.stage(step), trainer.schedule.c(step))
    trainer.state.global_step = step
    batch = default_data_collator(trainer.train_dataset[: trainer.args.per_device_train_batch_size])
    batch = trainer._prepare_inputs(batch)
    timed = compiled_as_for_training(trainer.accelerator, model) if trainer.args.torch_compile else model
    times = []
    timed.train()
    try:
        with run_recompile_limit():
            for _ in range(repeats):
                _synchronize()
                started = time.perf_counter()
                # the mixed precision that accelerate gives the prepared student during training
                with trainer.accelerator.autocast(), trainer.compute_loss_context_manager():
                    loss = trainer.compute_loss(timed, batch)
                trainer.accelerator.backward(loss)
                _synchronize()
                times.append(time.perf_counter() - started)
    finally:
        model.zero_grad(set_to_none=True)
        state.set(saved_stage, saved_c)
        trainer.state.global_step = saved_step
    return {"first_step_s": times[0], "step_s": min(times[1:]) if len(times) > 1 else times[0]}


def compiled_as_for_training(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """`model` compiled as `accelerator.prepare_model` compiles it (`accelerate.utils.compile_regions` under regional
    compilation, else `torch.compile`), with the same settings; `model` itself is left as it is."""
    plugin = accelerator.state.dynamo_plugin
    if getattr(plugin, "use_regional_compilation", False):
        from accelerate.utils import compile_regions

        return compile_regions(model, **plugin.to_kwargs())
    return torch.compile(model, **plugin.to_kwargs())


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
