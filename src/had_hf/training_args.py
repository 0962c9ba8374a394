"""`HADTrainingArguments`: `TrainingArguments` plus the HAD schedule (METHOD.md sections 2 and 5)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .schedule import StageSchedule

logger = logging.getLogger(__name__)


@dataclass
class HADTrainingArguments(TrainingArguments):
    """Training arguments of `HADDistillationTrainer`.

    Adds the HAD schedule to [`~transformers.TrainingArguments`]. Defaults changed from `TrainingArguments`, to
    the paper's (METHOD.md section 5):

    - `learning_rate`: 2e-5 (was 5e-5), the learning rate of stages 1-3.
    - `per_device_train_batch_size`: 16 (was 8).
    - `max_grad_norm`: 0.5 (was 1.0).
    - `lr_scheduler_type`: `"constant"` (was `"linear"`): the paper changes the rate only at stage 4.
    - `use_cpu` becomes `True` when several processes (WORLD_SIZE > 1) run on a machine without an accelerator:
      `TrainingArguments` gives CPU data parallelism only with it, and otherwise each process trains alone.
    - `max_steps`: when left at -1, the length of the schedule (about 29,200 steps with the defaults). A user value
      stretches every stage in proportion, so that a short run still passes through all four stages.
    The optimizer stays `adamw_torch` with `weight_decay=0.0`, which is Adam, as in the paper.

    Args:
        c_start (`float`, *optional*, defaults to 5.0): c at the start of stage 1.
        c_switch (`float`, *optional*, defaults to 1.0): c at which stage 1 (tanh) hands over to stage 2 (sign).
        c_end (`float`, *optional*, defaults to 0.05): c at which stage 2 ends and the STE stage starts.
        c_decay (`float`, *optional*, defaults to 0.9995): c is multiplied by this after every optimizer step.
        ste_steps (`int`, *optional*, defaults to 10000): length of stage 3 (straight-through estimator). 0 leaves the
            stage out, also when `max_steps` stretches the schedule.
        refinement_steps (`int`, *optional*, defaults to 10000): length of stage 4 (refinement). 0 leaves the stage
            out, also when `max_steps` stretches the schedule.
        refinement_learning_rate (`float`, *optional*, defaults to 2e-6): the learning rate of stage 4.
        ste_learning_rate (`float`, *optional*): the learning rate of stage 3 (STE); unset: `learning_rate`.
        ste_clip (`float`, *optional*, defaults to 1.0): the STE passes gradient where |x / sigma| <= ste_clip.
        attention_loss (`bool`, *optional*, defaults to `True`): use the attention-map loss in stages 1-3 (False
            is the paper's "w/o AD" ablation).
        attention_loss_weight (`float`, *optional*, defaults to 1.0): weight of the attention loss in stages 1-3.
        ste_attention_loss_weight (`float`, *optional*): weight of the attention loss in stage 3 (STE); unset:
            `attention_loss_weight`. 0 trains the STE stage on the output loss alone.
        refinement_attention_loss_weight (`float`, *optional*, defaults to 0.0): weight of the attention loss in
            stage 4 (the paper removes it: 0).
        skip_tanh (`bool`, *optional*, defaults to `False`): replace stages 1-2 by as many STE steps (the paper's
            "w/o tanh" ablation).
        recalibrate_sigma (`bool`, *optional*, defaults to `False`): calibrate sigma again, on the student, before
            the first step of the STE stage, where the forward becomes exactly binary (not in the paper).
        calibration_batches (`int`, *optional*, defaults to 100): minibatches for sigma calibration.
        calibration_batch_size (`int`, *optional*, defaults to 16): their size.
        sigma_per_head (`bool`, *optional*, defaults to `False`): calibrate one sigma per head instead of one per
            layer (not in the paper; see `HADConfig.sigma_per_head`).
        use_regional_compilation (`bool`, *optional*, defaults to `False`): with `torch_compile`, compile the
            repeated blocks of the student and the teacher (their decoder or encoder layers) one by one instead of
            each whole model, so that all the layers of a model share one graph per stage (Accelerate's
            `TorchDynamoPlugin(use_regional_compilation=True)`, `accelerate.utils.compile_regions`): the time spent
            compiling then does not grow with the number of layers. What lies between the layers' graphs runs
            uncompiled, so where steps are launch-bound (small models, small batches) they can be slower than those
            of the model compiled whole: it pays where compiling is a large part of the run.
        compile_dynamic_lengths (`bool`, *optional*, defaults to `True`): with `torch_compile`, trace the token
            dimension of the 2-D inputs (token ids, masks, labels) as dynamic from the first step, so that batches
            padded to lengths that change from step to step run one graph per stage and model (the batch dimension
            is always traced as dynamic: an epoch's last batch is shorter). Turn it off for data of one fixed length
            (packed windows), whose graphs then keep their length static. See `had_hf.compilation.mark_shapes_dynamic`.
    """

    c_start: float = field(default=5.0, metadata={"help": "c at the start of stage 1 (tanh)."})
    c_switch: float = field(default=1.0, metadata={"help": "c at which stage 1 (tanh) hands over to stage 2 (sign)."})
    c_end: float = field(default=0.05, metadata={"help": "c at which stage 2 ends and the STE stage starts."})
    c_decay: float = field(default=0.9995, metadata={"help": "Per-optimizer-step decay factor of c."})
    ste_steps: int = field(default=10_000, metadata={"help": "Length of stage 3 (straight-through estimator)."})
    refinement_steps: int = field(default=10_000, metadata={"help": "Length of stage 4 (refinement)."})
    refinement_learning_rate: float = field(default=2e-6, metadata={"help": "Learning rate of stage 4."})
    ste_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of stage 3 (STE); default: --learning_rate."}
    )
    ste_clip: float = field(default=1.0, metadata={"help": "STE passes gradient where |x/sigma| <= ste_clip."})
    attention_loss: bool = field(
        default=True, metadata={"help": "Use the attention-map loss in stages 1-3 (False: the 'w/o AD' ablation)."}
    )
    attention_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the attention loss, stages 1-3."})
    ste_attention_loss_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the attention loss in stage 3 (STE); unset: attention_loss_weight."},
    )
    refinement_attention_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the attention loss in stage 4 (the paper: 0)."}
    )
    skip_tanh: bool = field(
        default=False, metadata={"help": "Replace stages 1-2 by as many STE steps (the 'w/o tanh' ablation)."}
    )
    recalibrate_sigma: bool = field(
        default=False,
        metadata={"help": "Calibrate sigma again, on the student, where the STE stage starts (not in the paper)."},
    )
    calibration_batches: int = field(default=100, metadata={"help": "Minibatches for sigma calibration."})
    calibration_batch_size: int = field(default=16, metadata={"help": "Batch size of the calibration minibatches."})
    use_regional_compilation: bool = field(
        default=False,
        metadata={
            "help": "With torch_compile: compile the repeated layers of student and teacher one by one (one graph "
            "shared by all layers) instead of each whole model (Accelerate's regional compilation)."
        },
    )
    compile_dynamic_lengths: bool = field(
        default=True,
        metadata={
            "help": "With torch_compile: trace the token length as dynamic from the first step (one graph per stage "
            "for batches of changing length); off for data of one fixed length."
        },
    )
    sigma_per_head: bool = field(
        default=False, metadata={"help": "Calibrate one sigma per head instead of per layer (not in the paper)."}
    )

    # Defaults changed from TrainingArguments (see the class docstring).
    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate of stages 1-3 (Adam)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size per device for training."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Gradient clipping norm (the paper: 0.5)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "LR scheduler; stage 4 lowers its base."})

    def __post_init__(self):
        for name in ("learning_rate", "refinement_learning_rate", "ste_clip", "ste_learning_rate"):
            value = getattr(self, name)
            if name == "ste_learning_rate" and value is None:
                continue
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number > 0, got {value}.")
        for name in (
            "calibration_batches",
            "calibration_batch_size",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("attention_loss_weight", "ste_attention_loss_weight", "refinement_attention_loss_weight"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps must be -1 (the length of the schedule) or a number of steps >= 4, got {self.max_steps}."
            )
        if self.use_regional_compilation and not (
            self.torch_compile or self.torch_compile_backend or self.torch_compile_mode
        ):
            raise ValueError("use_regional_compilation compiles regions with torch_compile: set torch_compile=True.")
        self.user_max_steps = self.max_steps if self.max_steps > 0 else None
        schedule = self.schedule()  # validates the c range, decay and stage lengths
        if self.max_steps <= 0:
            self.max_steps = schedule.total
        if not self.use_cpu and _several_processes_without_accelerator():
            # TrainingArguments gives CPU data parallelism only with use_cpu (accelerate launch --cpu sets it through
            # ACCELERATE_USE_CPU; torchrun does not): without it every process would train alone on all the data
            logger.warning("Several processes and no GPU: training data-parallel on the CPU (use_cpu=True, gloo).")
            self.use_cpu = True
        super().__post_init__()

    def schedule(self) -> StageSchedule:
        """The stage schedule these arguments describe."""
        return StageSchedule.build(
            c_start=self.c_start,
            c_switch=self.c_switch,
            c_end=self.c_end,
            gamma=self.c_decay,
            ste_steps=self.ste_steps,
            refinement_steps=self.refinement_steps,
            skip_tanh=self.skip_tanh,
            max_steps=getattr(self, "user_max_steps", None),
        )

    def stage_attention_loss_weights(self) -> tuple[float, float, float, float]:
        """The attention-loss weight of stages 1-4 (tanh, sign, STE, refinement)."""
        return stage_attention_loss_weights(*(getattr(self, name) for name in ATTENTION_LOSS_FIELDS))


# torch.compile modes whose inductor code runs in CUDA graphs: the distillation step copies the teacher's outputs out
# of its graph's memory before the student's graph runs (`HADDistillationTrainer.compute_loss`)
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")

# the training arguments that set the attention loss of each stage, in the order `stage_attention_loss_weights` takes
ATTENTION_LOSS_FIELDS = (
    "attention_loss",
    "attention_loss_weight",
    "ste_attention_loss_weight",
    "refinement_attention_loss_weight",
)


def stage_attention_loss_weights(
    attention_loss: bool,
    attention_loss_weight: float,
    ste_attention_loss_weight: float | None,
    refinement_attention_loss_weight: float,
) -> tuple[float, float, float, float]:
    """The attention-loss weight of stages 1-4 (tanh, sign, STE, refinement) from the training arguments of those
    names: stages 1-2 take `attention_loss_weight`, stage 3 its own weight unless unset (then stages 1-2's), stage 4
    its own; all 0 without the attention loss ("w/o AD")."""
    if not attention_loss:
        return (0.0, 0.0, 0.0, 0.0)
    ste = attention_loss_weight if ste_attention_loss_weight is None else ste_attention_loss_weight
    return (attention_loss_weight, attention_loss_weight, ste, refinement_attention_loss_weight)


def _several_processes_without_accelerator() -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accelerator = getattr(torch, "accelerator", None)
    return not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available())
