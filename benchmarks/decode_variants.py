"""Variants of the decode kernels' launch side by side on one GPU, at the grouped-query shape and at
B8-H16-d64-n64k: the attend kernel's gather loop (hand-written prefetch or Triton's pipeliner), the gather interleaved
with the selection, its tile, warps and split count. At the generation shapes of issue 21 (`SHORT_SHAPES`, n <= 8k)
and past them (16k, 32k): the short-context kernel (one launch, `decode_short_kernel`) against the three-kernel path,
its rows per program, gather and warps.

    PYTHONPATH=src python benchmarks/decode_variants.py --out benchmarks/results/decode_variants.json
    PYTHONPATH=src python benchmarks/decode_variants.py --shapes $(python benchmarks/decode_variants.py --list-short) \
        --out benchmarks/results/decode_short.json

For each shape (one query position, N = ceil(0.117 n), bf16; the inputs of `decode_floors.py`) and each variant of
`hamming_topk_decode`'s options:
1. its output against the default's (bit for bit, and the relative difference of the two: variants that sum the same
   tiles in the same order give the same bits, those with other splits differ by rounding);
2. the time of a call in CUDA graphs (`triton.testing.do_bench_cudagraph`, median; no L2 flush between replays, as
   `decode.py`'s `speedup_graph`), over the best SDPA backend timed the same way, and each kernel's time (torch
   profiler).
The default is timed first and again last: the difference is the run's noise. The JSON is written after every
variant. Exits 1 if a variant's output differs from the default's by more than rounding.

`--smoke` runs tiny shapes on the CPU through Triton's interpreter (set TRITON_INTERPRET=1), without timing, to test
this script (every variant, the short kernel's included).
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
from decode import SHAPES, SMOKE_SHAPES, Shape, kernel_breakdown, sdpa_callable, sdpa_layouts  # noqa: E402
from decode_floors import _decode_inputs  # noqa: E402

from had_hf.kernels.decode_attend_kernel import _attend_kernel  # noqa: E402
from had_hf.kernels.decode_distance_kernel import _distance_kernel  # noqa: E402
from had_hf.kernels.decode_fine_count_kernel import _fine_count_kernel  # noqa: E402
from had_hf.kernels.decode_launch import short_kernel_wanted  # noqa: E402
from had_hf.kernels.decode_short_kernel import _short_decode_kernel  # noqa: E402
from had_hf.kernels.triton_decode import hamming_topk_decode  # noqa: E402

# name: options of hamming_topk_decode. The default is also timed again at the end of each shape ("default-again").
# Per-kernel options hold (distance, fine count, attend). What each tries: a multiprocessor holds 65,536 registers,
# so a kernel of r registers per thread and 4 warps fits 65536 // (128 r) programs at once (r rounded up to 8); more
# programs than fit make a second, mostly idle wave.
PIPELINED = dict(gather_stages=3)
# the 4-row selection on (32, 8) or (64, 8) tiles: fewer registers than on the default (128, 8)
SELECT_256, SELECT_512 = dict(block_n=256), dict(block_n=512)
VARIANTS = {
    "default": {},
    "select256": SELECT_256,
    "select512": SELECT_512,
    "pipelined-3-attend-128-registers": dict(max_registers=(None, None, 128), **PIPELINED),
    "select256-pipelined-3": dict(SELECT_256, **PIPELINED),
    "select256-pipelined-3-block64": dict(SELECT_256, gather_block=64, **PIPELINED),
    "select512-pipelined-3-block64": dict(SELECT_512, gather_block=64, **PIPELINED),
    "split-group-2-select256-pipelined-3-block64": dict(
        SELECT_256, attend_split_group=2, gather_block=64, **PIPELINED
    ),
    "select256-interleaved-pipelined-3-block64-128-registers": dict(
        SELECT_256, interleave_gather=True, gather_block=64, max_registers=(None, None, 128), **PIPELINED
    ),
    "programs-per-sm-3": dict(programs_per_sm=3),
    "pipelined-2": dict(gather_stages=2),
    "pipelined-3": PIPELINED,
    "pipelined-3-block64": dict(gather_block=64, **PIPELINED),
    "pipelined-3-block64-attend-64-registers": dict(gather_block=64, max_registers=(None, None, 64), **PIPELINED),
    # the path chosen explicitly ("default" is the dispatcher's choice: the three kernels, while
    # decode_launch.SHORT_BY_DEFAULT is off)
    "three-kernel": dict(short_kernel=False),
    "short": dict(short_kernel=True),
    # the short kernel's rows per program (default: one, unless more than 2 programs per multiprocessor)
    "short-rows-2": dict(short_row_block=2),
    "short-rows-4": dict(short_row_block=4),
    # its gather (default: Triton's pipeliner, 3 stages of 64 rows): fewer or more rows in flight
    "short-prefetch": dict(short_kernel=True, gather_stages=0),
    "short-prefetch-block32": dict(short_kernel=True, gather_stages=0, gather_block=32),
    "short-pipelined-4-block128": dict(short_kernel=True, gather_stages=4, gather_block=128),
    "short-8-warps": dict(short_num_warps=8),
    "short-8-warps-block128": dict(short_num_warps=8, gather_block=128),
    # its counting passes over 2048 (row, key) pairs per iteration and its selection over 2048 keys
    "short-count2048-select2048": dict(short_kernel=True, hist_block_elements=2048, block_n=2048),
}
# per shape, the variants timed: 4-row programs at the GQA shape, one-row programs at the other
SHAPE_VARIANTS = {
    "GQA-B1-H32/8-d128-n128k": [
        "default",
        "select256",
        "select512",
        "programs-per-sm-3",
        "pipelined-3-attend-128-registers",
        "select256-pipelined-3",
        "select256-pipelined-3-block64",
        "select512-pipelined-3-block64",
        "split-group-2-select256-pipelined-3-block64",
        "select256-interleaved-pipelined-3-block64-128-registers",
    ],
    "B8-H16-d64-n64k": [
        "default",
        "pipelined-2",
        "pipelined-3",
        "pipelined-3-block64",
        "pipelined-3-block64-attend-64-registers",
    ],
}

# issue 21's generation shapes (one layer of the random Llama at 4k, SmolLM2 at 2k and 8k, batch 8 at 4k), and longer
# contexts where the dispatcher's rule hands over to the three kernels (n x dv = 2^20: 16k keys at d = 64)
SHORT_SHAPES = [
    Shape("GEN-B1-H32/8-d64-n4k", 1, 32, 8, 64, 4096),
    Shape("GEN-B1-H9/3-d64-n2k", 1, 9, 3, 64, 2048),
    Shape("GEN-B1-H9/3-d64-n8k", 1, 9, 3, 64, 8192),
    Shape("GEN-B8-H16-d64-n4k", 8, 16, 16, 64, 4096),
    Shape("GEN-B1-H32/8-d64-n16k", 1, 32, 8, 64, 16384),
    Shape("GEN-B1-H9/3-d64-n16k", 1, 9, 3, 64, 16384),
    Shape("GEN-B8-H16-d64-n16k", 8, 16, 16, 64, 16384),
    Shape("GEN-B1-H32/8-d64-n32k", 1, 32, 8, 64, 32768),
]
SHORT_VARIANTS = [name for name in VARIANTS if name.startswith("short")]
for _shape in SHORT_SHAPES:
    SHAPE_VARIANTS[_shape.name] = ["default", "three-kernel"] + (
        SHORT_VARIANTS if _shape.num_keys <= 8192 else ["short", "short-8-warps", "short-pipelined-4-block128"]
    )

# relative difference (Frobenius) of a variant's bf16 output from the default's beyond which it counts as different:
# the same kept keys summed in another order differ by bf16 rounding (~1e-3)
MAX_RELATIVE_DIFFERENCE = 1e-2


def compiled_kernels() -> dict[int, dict]:
    """Every binary of the three decode kernels compiled so far (Triton's in-memory cache): its registers per thread,
    spilled bytes, shared memory and warps. Empty where this Triton's cache layout is not the one read here."""
    found = {}
    for kernel in (_distance_kernel, _fine_count_kernel, _attend_kernel, _short_decode_kernel):
        try:
            for cache in getattr(kernel, "device_caches", {}).values():
                binaries = cache[0] if isinstance(cache, tuple) else cache
                for binary in binaries.values():
                    found[id(binary)] = dict(
                        kernel=kernel.fn.__name__,
                        registers=getattr(binary, "n_regs", None),
                        spills=getattr(binary, "n_spills", None),
                        shared=binary.metadata.shared,
                        num_warps=binary.metadata.num_warps,
                    )
        except Exception as error:  # noqa: BLE001  (a report, not a requirement)
            found[id(kernel)] = {"kernel": kernel.fn.__name__, "error": f"{type(error).__name__}: {error}"[:200]}
    return found


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


def run_shape(shape, names: list[str], device: torch.device, smoke: bool, result: dict, write) -> dict:
    """Fills `result` with the variants `names` at `shape` (calling `write` after each, so that a run cut short keeps
    what it measured)."""
    print(f"\n== {shape.name}: N = {shape.top_n}", flush=True)
    query, key_words, value = _decode_inputs(shape, device)
    alpha = 1.0 / math.sqrt(shape.head_dim)
    result.update(shape=shape.name, top_n=shape.top_n, variants=[])
    if not smoke:
        # the dense keys only for SDPA (seeded as _decode_inputs seeds them; SDPA's time does not depend on them)
        key = torch.randn(shape.batch, shape.num_kv_heads, shape.num_keys, shape.head_dim, device=device)
        result["sdpa_graph"] = best_sdpa_graph(query, key.to(value.dtype), value, shape.group)
        del key
        print(f"  sdpa in graphs: {result['sdpa_graph']}", flush=True)
    known = compiled_kernels()
    default_out = hamming_topk_decode(query, key_words, value, None, shape.top_n, alpha)
    for name in [*names, "default-again"]:
        options = VARIANTS[name.removesuffix("-again")]

        def call(options=options):
            return hamming_topk_decode(query, key_words, value, None, shape.top_n, alpha, **options)

        short = short_kernel_wanted(options, shape.num_keys, shape.head_dim, shape.head_dim)
        row: dict = {"name": name, "options": options, "path": "short" if short else "three-kernel"}
        try:
            out = call()
            # the binaries this variant compiled (the default's at its first row)
            compiled = compiled_kernels()
            row["compiled"] = [info for key, info in compiled.items() if key not in known]
            known = compiled
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
        write()
    timed = [row for row in result["variants"] if "graph_us" in row]
    if timed:
        result["best"] = min(timed, key=lambda row: row["graph_us"])["name"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_variants.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--shapes", nargs="*", default=["GQA-B1-H32/8-d128-n128k", "B8-H16-d64-n64k"],
                        help="names of the shapes to run (`--list-short`: those of the short kernel)")  # fmt: skip
    parser.add_argument("--variants", nargs="*", help="names of the variants to run (default: each shape's own)")
    parser.add_argument("--list-short", action="store_true", help="print the names of the short-context shapes")
    args = parser.parse_args(argv)
    if args.list_short:
        print(" ".join(shape.name for shape in SHORT_SHAPES))
        return 0
    unknown = set(args.variants or ()) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        runs = [(shape, args.variants or list(VARIANTS)) for shape in SMOKE_SHAPES]
    else:
        by_name = {shape.name: shape for shape in [*SHAPES, *SHORT_SHAPES]}
        runs = [(by_name[name], args.variants or SHAPE_VARIANTS[name]) for name in args.shapes]
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

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    for shape, names in runs:
        report["shapes"].append({})
        run_shape(shape, names, device, args.smoke, report["shapes"][-1], write)
        write()
    rows = [row for shape in report["shapes"] for row in shape["variants"]]
    ok = all("error" in row or row["relative_difference"] <= MAX_RELATIVE_DIFFERENCE for row in rows)
    print(f"\nwrote {args.out}; every variant's output equals the default's up to rounding: {ok}")
    for shape in report["shapes"]:
        print(shape["shape"], "best:", shape.get("best"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
