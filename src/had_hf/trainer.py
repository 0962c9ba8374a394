"""`HADDistillationTrainer`: distills a dense teacher into a HAD student (METHOD.md sections 2-5)."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_datasets_available

from .calibration import calibrate
from .callbacks import HADStageCallback
from .capture import STORE_KWARG, HADCaptureStore, bound_modules, forward_inputs
from .compilation import (
    mark_scores_dynamic,
    mark_shapes_dynamic,
    run_recompile_limit,
    use_own_compile_settings,
    use_regional_compilation,
)
from .config import HADConfig
from .integration import attention_module_names, convert, use_dense_capture
from .losses import is_decoder_layer, output_kl, output_mse, query_mask, token_mask
from .parallel import CalibrationAtTrainBegin, check_parallelism, prepare_teacher
from .peft_student import convert_peft_student, dense_teacher, is_peft_model, write_had_config
from .state import INFERENCE, runtime_state
from .trainer_card import TrainerCardMixin
from .training_args import CUDA_GRAPH_COMPILE_MODES, HADTrainingArguments

if is_datasets_available():
    import datasets

logger = logging.getLogger(__name__)

# the metric prefix of `evaluate_deployable`
DEPLOYABLE_PREFIX = "deployable"
PAPER_TITLE = "Hamming Attention Distillation: Binarizing Keys and Queries for Efficient Long-Context Transformers"


class HADDistillationTrainer(TrainerCardMixin, Trainer):
    """Trains a HAD student to match a frozen dense teacher: attention-map KL plus output KL, in four stages.

    Args:
        model (`PreTrainedModel`): the student, normally a copy of the teacher. If it is not a HAD model yet it is
            converted with `had_config`.
        teacher_model (`PreTrainedModel`, *optional*): the task-trained teacher; frozen, in eval mode, placed on the
            device by Accelerate (not wrapped for data parallelism: it is never trained; sharded like the student
            under FSDP2). `None` for a peft student (a `PeftModel`, e.g. from
            `had_hf.peft_student.make_peft_student`): the teacher is then the student's own base with the adapter
            disabled and dense attention, so no second copy of the base weights is held.
        args (`HADTrainingArguments`): the training arguments, with the stage schedule.
        had_config (`HADConfig`, *optional*): used to convert a student that is not a HAD model.
        **kwargs: the other arguments of [`~transformers.Trainer`] (datasets, collator, processing class, ...).

    The student's sigma is calibrated on the training set before stage 1 when it is not set yet (under FSDP2, on the
    sharded student at the start of training; with `args.recalibrate_sigma`, again on the student before the STE
    stage). With an evaluation set, every stage end is evaluated twice: in the stage's own transform (`eval_*` in the
    log) and as the model would be saved (`evaluate_deployable`, `deployable_*` in the log).
    """

    _tag_names = ["had", "had_hf", "binary-attention", "distillation"]
    _name = "HAD distillation"
    _paper = {"title": PAPER_TITLE, "method": "Hamming Attention Distillation (HAD)"}

    def __init__(
        self,
        model: PreTrainedModel,
        teacher_model: PreTrainedModel | None = None,
        args: HADTrainingArguments | None = None,
        had_config: HADConfig | None = None,
        **kwargs,
    ):
        if args is None:
            args = HADTrainingArguments(output_dir="had-distillation")
        if not isinstance(args, HADTrainingArguments):
            raise TypeError(f"args must be HADTrainingArguments, got {type(args).__name__}.")
        self.is_peft_student = is_peft_model(model)
        if self.is_peft_student:
            self.had_config: HADConfig = convert_peft_student(model, had_config)
        else:
            if teacher_model is None:
                raise ValueError(
                    "teacher_model is required, unless the student is a peft model (whose teacher is its own base "
                    "with the adapter disabled)."
                )
            student_config = getattr(model.config, "quantization_config", None)
            if not isinstance(student_config, HADConfig):
                if had_config is None:
                    raise ValueError(
                        "The student is not a HAD model: pass `had_config=HADConfig(...)` or call `had_hf.convert` "
                        "first."
                    )
                convert(model, had_config)
            self.had_config = model.config.quantization_config
        if self.had_config.ste_clip != args.ste_clip:
            logger.warning(
                "The HADConfig's ste_clip=%s is replaced by the training argument ste_clip=%s: the STE clip is a "
                "training setting (set it with HADTrainingArguments(ste_clip=...) or --ste_clip).",
                self.had_config.ste_clip,
                args.ste_clip,
            )
        self.had_config.ste_clip = args.ste_clip
        if args.sigma_per_head:
            self.had_config.sigma_per_head = True

        if teacher_model is not None:
            use_dense_capture(teacher_model, self.had_config)
            teacher_layers, student_layers = attention_module_names(teacher_model), attention_module_names(model)
            if teacher_layers != student_layers:
                raise ValueError(
                    "The student's attention layers must match the teacher's (start the student as a copy of the "
                    f"teacher): teacher {teacher_layers[:3]}..., student {student_layers[:3]}..."
                )
            teacher_model.eval()
            teacher_model.requires_grad_(False)

        self.schedule = args.schedule()
        self.stage_callback = HADStageCallback(
            runtime_state(model.get_base_model() if self.is_peft_student else model),
            self.schedule,
            args.refinement_learning_rate,
            evaluate_at_stage_ends=kwargs.get("eval_dataset") is not None,
            on_binary_start=self.recalibrate_on_student if args.recalibrate_sigma else None,
            ste_learning_rate=args.ste_learning_rate,
        )
        callbacks = [self.stage_callback, *(kwargs.pop("callbacks", None) or [])]
        for module in (model, teacher_model):
            # Accelerate marks a model it prepared without a wrapper (a Trainer's evaluation) `_is_accelerate_prepared`,
            # and copies keep the mark: this trainer's Accelerator would then not wrap the student for DDP (each
            # process training alone) nor place the teacher
            if module is not None:
                module.__dict__.pop("_is_accelerate_prepared", None)
        use_own_compile_settings(args)
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)

        check_parallelism(self)
        use_regional_compilation(self.accelerator, args.torch_compile and args.use_regional_compilation)
        self.teacher = teacher_model and prepare_teacher(self.accelerator, teacher_model)
        self.stage_callback.state.to(self.args.device)  # c as a tensor where a compiled student reads it
        # compute_loss returns a per-micro-batch mean: let the Trainer divide it for gradient accumulation
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._had_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        # in CUDA graphs: where the teacher's scores are copied at each step (`HADCaptureStore.copy_scores`)
        self._teacher_score_buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._bound_modules: dict[torch.nn.Module, list[torch.nn.Module]] = {}  # see bound_modules
        self._flop_counts: dict[tuple[torch.nn.Module, int], int] = {}  # see floating_point_ops
        self.teacher_metrics: dict[str, float] | None = None  # set by evaluate_teacher
        self._predict_with_teacher = False
        config = model.config
        self.is_regression = getattr(config, "problem_type", None) == "regression" or (
            getattr(config, "num_labels", 2) == 1
        )
        # decoder queries and tokens are masked with the decoder's mask (see losses.query_mask)
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        if args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant", False):
            raise ValueError(
                "Reentrant gradient checkpointing runs the forward without gradients, so the attention loss would "
                'not reach the student: set gradient_checkpointing_kwargs={"use_reentrant": False}.'
            )
        logger.info("HAD schedule: %s", self.schedule.describe())

    # ---------------------------------------------------------------- loss
    def attention_loss_weight(self, step: int) -> float:
        """The attention-loss weight at `step`: its stage's (`HADTrainingArguments.stage_attention_loss_weights`)."""
        return self.args.stage_attention_loss_weights()[self.schedule.phase(step) - 1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = forward_inputs(model, inputs)
        if self.args.torch_compile:
            mark_shapes_dynamic(inputs, lengths=self.args.compile_dynamic_lengths)
        weight = self.attention_loss_weight(self.state.global_step)
        # the attention KL is computed inside the student's attention calls, layer by layer in chunks of query rows,
        # against the teacher's queries and keys (see had_hf.capture): no layer's full map is kept. A compiled
        # teacher records them in every stage of a run with an attention loss, so that it stays one graph.
        capture_scores = weight > 0 or (self.args.torch_compile and self.args.attention_loss)
        teacher_store = HADCaptureStore(capture_logits=False, capture_scores=capture_scores)
        student_store = HADCaptureStore(
            capture_logits=False,
            distill_from=teacher_store if weight > 0 else None,
            query_mask=lambda name: query_mask(inputs, self.is_encoder_decoder and is_decoder_layer(name)),
        )
        # each store is bound to its model's attention modules for the forward pass: compiled code then finds its
        # layer's entries through its module, and every decoder block can share one graph (`compile_regions`)
        with torch.no_grad(), teacher_store.bound(self.bound_modules(self.teacher_modules(model))):
            teacher_logits = self.teacher_forward(model, inputs, teacher_store).logits
        if self.runs_in_cuda_graphs:  # the teacher's graph returned them in memory that the student's graph reuses
            teacher_store.copy_scores(self._teacher_score_buffers)
            teacher_logits = teacher_logits.clone()
        if self.args.torch_compile:
            mark_scores_dynamic(teacher_store, lengths=self.args.compile_dynamic_lengths)
        with student_store.bound(self.bound_modules(model)):
            student_outputs = model(**inputs, **{STORE_KWARG: student_store})

        if self.is_regression:
            loss_out = output_mse(teacher_logits, student_outputs.logits)
        else:
            loss_out = output_kl(
                teacher_logits,
                student_outputs.logits,
                token_mask(inputs, student_outputs, self.is_encoder_decoder),
            )
        loss = loss_out
        if weight > 0:
            loss_attn = student_store.attention_kl()
            loss = loss + weight * loss_attn
        else:
            loss_attn = torch.zeros((), device=loss_out.device)
        if model.training:  # kept on the device until logged: reading them at every step would wait for the device
            self._had_metrics["loss_attn"].append(loss_attn.detach())
            self._had_metrics["loss_out"].append(loss_out.detach())
        return (loss, student_outputs) if return_outputs else loss

    def bound_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The attention modules of `model` that the capture stores bind at each step (`capture.bound_modules`), found
        once per model: a walk over every module at every step would add host time to steps that the host's launches
        bound (benchmarks/README.md, "Host time per distillation step")."""
        modules = self._bound_modules.get(model)
        if modules is None:
            modules = self._bound_modules[model] = bound_modules(model)
        return modules

    def floating_point_ops(self, inputs: dict) -> int:
        """Transformers' estimate of a step's floating-point operations (`Trainer.floating_point_ops`), computed once
        per model and input size: transformers counts the model's parameters at every step, two walks over its
        modules."""
        main_input = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        key = (self.model, main_input.numel() if isinstance(main_input, torch.Tensor) else -1)
        if key not in self._flop_counts:
            self._flop_counts[key] = super().floating_point_ops(inputs)
        return self._flop_counts[key]

    def teacher_modules(self, model) -> torch.nn.Module:
        """The modules the teacher's forward runs: the teacher model's, or a peft student's (its base, adapter off)."""
        return self.teacher if self.teacher is not None else model

    def teacher_forward(self, model, inputs: dict, store: HADCaptureStore, compiled: bool = True):
        """The teacher's outputs: the teacher model's (with `compiled=False` without the `torch.compile` wrapper that
        the Accelerator puts on it under `torch_compile`), or a peft student's with its adapter disabled."""
        if self.teacher is not None:
            teacher = (
                self.teacher if compiled else self.accelerator.unwrap_model(self.teacher, keep_torch_compile=False)
            )
            return teacher(**inputs, **{STORE_KWARG: store})
        student = self.accelerator.unwrap_model(model)
        with dense_teacher(student):
            return student(**inputs, **{STORE_KWARG: store})

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation runs the student alone (no teacher, no logit capture): the metrics are the student's; the
        teacher's within `evaluate_teacher`. Under `torch_compile` the teacher is evaluated uncompiled, as the Trainer
        evaluates the student once a model is prepared: a few evaluations cost less than compiling their graphs."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad():
            if self._predict_with_teacher:
                store = HADCaptureStore(capture_logits=False)
                outputs = self.teacher_forward(model, forward_inputs(model, inputs), store, compiled=False)
            else:
                outputs = model(**forward_inputs(model, inputs))
        if prediction_loss_only:
            return None, None, None
        logits = outputs.logits.detach()
        # kept past the next batch's forward, whose graph run would reuse the memory of this one's outputs
        return None, logits.clone() if self.runs_in_cuda_graphs else logits, labels

    @property
    def runs_in_cuda_graphs(self) -> bool:
        """Whether the compiled models run in CUDA graphs (`torch_compile_mode` "reduce-overhead" or "max-autotune"),
        whose outputs live in memory that the next graph run reuses."""
        return bool(self.args.torch_compile and self.args.torch_compile_mode in CUDA_GRAPH_COMPILE_MODES)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The Trainer's evaluation; at a stage end during training, followed by `evaluate_deployable` on the same
        data (its metrics are logged on their own and added to the returned ones)."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        training = self.stage_callback.state.stage != INFERENCE
        if training and not isinstance(dataset, dict) and self.state.global_step in self.schedule.stage_ends():
            prefix = DEPLOYABLE_PREFIX + metric_key_prefix.removeprefix("eval")
            metrics.update(self.evaluate_deployable(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=prefix))
        return metrics

    def evaluate_deployable(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = DEPLOYABLE_PREFIX
    ) -> dict[str, float]:
        """Evaluates the student as it would be saved, whatever stage training is in: the inference stage (exact
        binary queries and keys, top-N; what `save_pretrained` and reloading give), then back to the training stage.
        Metrics are named `deployable_*` by default."""
        state = self.stage_callback.state
        stage, c = state.stage, state.c
        state.set(INFERENCE)
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            state.set(stage, c)

    # ---------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not any(key.startswith(("eval_", DEPLOYABLE_PREFIX + "_")) for key in logs):
            logs.update(self._mean_over_processes(self._had_metrics))
            self._had_metrics.clear()
            step = max(self.state.global_step - 1, 0)  # the step whose update was just made
            logs["stage"] = self.schedule.phase(step)
            logs["c"] = self.schedule.c(step)
        super().log(logs, start_time)

    def _mean_over_processes(self, metrics: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Each metric's mean since the last log (of its per-step 0-d tensors), averaged over the processes (each saw
        its own part of the batch), as the Trainer logs its loss. Collective: every process logs at the same steps."""
        names = sorted(name for name, values in metrics.items() if values)
        if not names:
            return {}
        means = torch.stack([torch.stack(metrics[name]).double().mean() for name in names]).to(self.args.device)
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means, reduction="mean")
        return dict(zip(names, means.tolist()))

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if self.is_peft_student:
            # the adapter folder also holds the base's config with the HADConfig (see had_hf.peft_student)
            write_had_config(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)

    # ---------------------------------------------------------------- calibration
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        calibrate_at_begin = False
        if not self.had_config.is_calibrated:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            if not (checkpoint and self._load_sigma(checkpoint)):
                # under FSDP the Trainer shards the student inside train(): calibrate it there
                calibrate_at_begin = self.is_fsdp_enabled
                if not calibrate_at_begin:
                    self.calibrate()
        with run_recompile_limit():
            if calibrate_at_begin:
                return self._train_calibrating_at_begin(resume_from_checkpoint, **kwargs)
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _train_calibrating_at_begin(self, resume_from_checkpoint, **kwargs):
        """Trains with the calibration at `on_train_begin`, on the sharded student on the devices (before sharding it
        is whole, where it was loaded: on the CPU, for a model that no single device holds)."""
        calibration = CalibrationAtTrainBegin(self)
        self.add_callback(calibration)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self.remove_callback(calibration)

    def calibrate(self, on_student: bool = False) -> HADConfig:
        """Measures sigma on `calibration_batches` random training batches (the same on every process): on the teacher
        (the student before training; a peft student's base with the adapter off), or with `on_student` on the
        student as it is now (a peft student's adapter on)."""
        if self.train_dataset is None:
            raise ValueError("Calibration needs a train_dataset (or set sigma_q/sigma_k in the HADConfig).")
        dataset, collator = self.train_dataset, self.data_collator
        if is_datasets_available() and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="calibration")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="calibration")
        generator = torch.Generator().manual_seed(self.args.seed)
        loader = DataLoader(
            dataset,
            batch_size=self.args.calibration_batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=collator,
        )
        model = self.accelerator.unwrap_model(self.model)
        if self.is_peft_student and not on_student:
            with model.disable_adapter():  # calibrated on the teacher, as for a copied student
                calibrate(model.get_base_model(), loader, num_batches=self.args.calibration_batches)
        else:
            student = model.get_base_model() if self.is_peft_student else model  # a peft student's adapter on
            calibrate(student, loader, num_batches=self.args.calibration_batches)
        self._broadcast_sigma()
        logger.info(
            "HAD: calibrated sigma on %d batches%s.",
            self.args.calibration_batches,
            " of the student" if on_student else "",
        )
        return self.had_config

    def recalibrate_on_student(self) -> None:
        """Calibrates sigma again, on the student as trained so far (`recalibrate_sigma`: before the STE stage)."""
        self.calibrate(on_student=True)

    def _broadcast_sigma(self) -> None:
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            sigmas = [self.had_config.sigma_q, self.had_config.sigma_k]
            broadcast_object_list(sigmas, from_process=0)
            self.had_config.sigma_q, self.had_config.sigma_k = sigmas

    def _load_sigma(self, checkpoint: str) -> bool:
        path = os.path.join(checkpoint, "config.json")
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as file:
            saved = json.load(file).get("quantization_config") or {}
        if not (saved.get("sigma_q") and saved.get("sigma_k")):
            return False
        self.had_config.sigma_q, self.had_config.sigma_k = saved["sigma_q"], saved["sigma_k"]
        return True
