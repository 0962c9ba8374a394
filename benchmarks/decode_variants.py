"""Variants of the decode kernels' launch side by side on one GPU: the attend kernel's gather loop (hand-written
prefetch or Triton's pipeliner), its warps, tile and split counts, at the grouped-query shape and at B8-H16-d64-n64k.

    PYTHONPATH=src python benchmarks/decode_variants.py --out benchmarks/results/decode_variants.json

For each shape (one query position, N = ceil(0.117 n), bf16; the inputs of `decode_floors.py`) and each variant of
`hamming_topk_decode`'s options:
1. its output against the default's (bit for bit, and the relative difference of the two);
2. the time of a call in CUDA graphs (`triton.testing.do_bench_cudagraph`, median; no L2 flush between replays, as
   `decode.py`'s `speedup_graph`), over the best SDPA backend timed the same way, and each kernel's time (torch
   profiler).
The default is timed first and again last: the difference is the run's noise. Exits 1 if a variant's output differs
from the default's by more than rounding.

`--smoke` runs tiny shapes on the CPU through Triton's interpreter (set TRITON_INTERPRET=1), without timing, to test
this script.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import triton  # noqa: E402
from decode import SHAPES, SMOKE_SHAPES, kernel_breakdown, sdpa_callable, sdpa_layouts  # noqa: E402
from decode_floors import _decode_inputs  # noqa: E402

from had_hf.kernels.triton_decode import hamming_topk_decode  # noqa: E402

VARIANT_SHAPES = ("GQA-B1-H32/8-d128-n128k", "B8-H16-d64-n64k")

# (name, options of hamming_topk_decode); the first is the default, timed again at the end. num_warps per kernel:
# (distance, fine count, attend)
VARIANTS = [
    ("default", {}),
    ("pipelined-gather-2", dict(gather_stages=2)),
    ("pipelined-gather-3", dict(gather_stages=3)),
    ("pipelined-gather-3-block64", dict(gather_stages=3, gather_block=64)),
    ("attend-8-warps", dict(num_warps=(None, None, 8))),
    ("pipelined-gather-3-attend-8-warps", dict(gather_stages=3, num_warps=(None, None, 8))),
    ("2-programs-per-sm", dict(programs_per_sm=2)),
    ("pipelined-gather-3-block64-2-programs-per-sm", dict(gather_stages=3, gather_block=64, programs_per_sm=2)),
]

# relative difference (Frobenius) of a variant's bf16 output from the default's beyond which it counts as different:
# the same kept keys summed in another order differ by bf16 rounding (~1e-3)
MAX_RELATIVE_DIFFERENCE = 1e-2


def graph_us(fn) -> float:
    return float(triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")) * 1e3


def best_sdpa_graph(query, key, value, group: int) -> dict:
    """The fastest of the flash and cuDNN backends (each GQA layout) in CUDA graphs."""
    times = {}
    for backend in ("flash", "cudnn"):
        for layout in sdpa_layouts(query, key, value, group):
            name = f"{backend}/{layout}"
            try:
                fn = sdpa_callable(query, key, value, group, name)
                fn()
                times[name] = round(graph_us(fn), 2)
            except RuntimeError as error:
                times[name] = f"unsupported: {str(error).splitlines()[0][:160]}"
    timed = {name: us for name, us in times.items() if isinstance(us, float)}
    best = min(timed, key=timed.get)
    return {"backends_us": times, "best": best, "best_us": timed[best]}


def run_shape(shape, device: torch.device, smoke: bool) -> dict:
    print(f"\n== {shape.name}: N = {shape.top_n}", flush=True)
    query, key_words, value = _decode_inputs(shape, device)
    alpha = 1.0 / math.sqrt(shape.head_dim)
    result: dict = {"shape": shape.name, "top_n": shape.top_n, "variants": []}
    if not smoke:
        # the dense keys only for SDPA (seeded as _decode_inputs seeds them; SDPA's time does not depend on them)
        key = torch.randn(shape.batch, shape.num_kv_heads, shape.num_keys, shape.head_dim, device=device)
        result["sdpa_graph"] = best_sdpa_graph(query, key.to(value.dtype), value, shape.group)
        del key
        print(f"  sdpa in graphs: {result['sdpa_graph']}", flush=True)
    default_out = hamming_topk_decode(query, key_words, value, None, shape.top_n, alpha)
    for name, options in [*VARIANTS, ("default-again", VARIANTS[0][1])]:

        def call(options=options):
            return hamming_topk_decode(query, key_words, value, None, shape.top_n, alpha, **options)

        row: dict = {"name": name, "options": options}
        try:
            out = call()
            difference = float((out.double() - default_out.double()).norm() / default_out.double().norm())
            row.update(equal_to_default=bool(torch.equal(out, default_out)), relative_difference=difference)
            if not smoke:
                row["graph_us"] = round(graph_us(call), 2)
                row["speedup_graph"] = round(result["sdpa_graph"]["best_us"] / row["graph_us"], 3)
                row["kernel_breakdown_us"] = kernel_breakdown(call)
        except Exception as error:  # a variant a Triton version cannot compile is reported, not fatal
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        result["variants"].append(row)
        print(f"  {name}: {row}", flush=True)
    timed = [row for row in result["variants"] if "graph_us" in row]
    if timed:
        result["best"] = min(timed, key=lambda row: row["graph_us"])["name"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_variants.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE_SHAPES if args.smoke else [shape for shape in SHAPES if shape.name in VARIANT_SHAPES]
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "timing": "triton.testing.do_bench_cudagraph, median, rep=30 ms; kernels: torch profiler, mean of 20 calls",
        "dtype": "bfloat16",
        "shapes": [],
    }
    for shape in shapes:
        report["shapes"].append(run_shape(shape, device, args.smoke))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    rows = [row for shape in report["shapes"] for row in shape["variants"]]
    ok = all("error" in row or row["relative_difference"] <= MAX_RELATIVE_DIFFERENCE for row in rows)
    print(f"\nwrote {args.out}; every variant's output equals the default's up to rounding: {ok}")
    for shape in report["shapes"]:
        print(shape["shape"], "best:", shape.get("best"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
