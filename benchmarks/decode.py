"""Decode attention on one GPU: HAD's Triton kernel against the best SDPA backend and the plain-PyTorch HAD path.

    PYTHONPATH=src python benchmarks/decode.py --out benchmarks/results/decode.json

For each shape (one query position, N = ceil(0.117 n) kept keys, bf16 queries/keys/values) it
1. checks the kernel's kept key sets against the PyTorch reference (exactly) and its output (relative error);
2. times, with `triton.testing.do_bench` (median; L2 flushed before every run), torch SDPA under each of the flash,
   cuDNN and memory-efficient backends (grouped-query shapes also with the query heads folded into the query length,
   which reads each key/value head once), a small sweep of kernel launch configurations, and the PyTorch reference;
3. reports the bytes each must move (SDPA: K and V; HAD: the key bits and N value rows per query row) and the
   bandwidth achieved, against a device-to-device copy measured in the same run.

Then, unless `--skip-e2e`, an end-to-end figure (`decode_e2e.py`): `generate()` decode tokens/s and peak memory of a
random-weights Llama-style model (8 layers, hidden 2048, 32 heads, 8 KV heads) at a 32k context, sdpa + DynamicCache
and sdpa + StaticCache against `hamming_topk` + HADPackedCache. The 32k prompt is prefilled once with sdpa and copied
into every cache, so the figure times decode steps only.

`--smoke` runs tiny shapes on the CPU through Triton's interpreter (set TRITON_INTERPRET=1), to test this script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import triton  # noqa: E402

from had_hf.kernels import pack_sign_bits, reference_hamming_topk_attention  # noqa: E402
from had_hf.kernels.triton_decode import hamming_topk_decode, triton_pack_sign_bits  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from decode_e2e import run_e2e  # noqa: E402
from prefill_measure import sdpa_backends  # noqa: E402

TOP_N_RATIO = 0.117


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_keys: int
    fixed_top_n: int | None = None  # a fixed N instead of ceil(TOP_N_RATIO * num_keys)

    @property
    def top_n(self) -> int:
        return self.fixed_top_n or math.ceil(TOP_N_RATIO * self.num_keys)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


SHAPES = [
    Shape("B8-H16-d64-n16k", 8, 16, 16, 64, 16384),
    Shape("B8-H16-d64-n64k", 8, 16, 16, 64, 65536),
    Shape("B8-H16-d64-n128k", 8, 16, 16, 64, 131072),
    Shape("GQA-B1-H32/8-d128-n128k", 1, 32, 8, 128, 131072),
    # N = 2,048 at any length (as DeepSeek's sparse attention keeps): the packed key stream dominates
    Shape("B8-H16-d64-n128k-N2048", 8, 16, 16, 64, 131072, fixed_top_n=2048),
]
SMOKE_SHAPES = [Shape("smoke-mha", 2, 2, 2, 64, 300), Shape("smoke-gqa", 1, 8, 2, 128, 200)]

# launch options of the kernel sweep; the first is the kernel's default. Ranked by CUDA-graph time (the GPU work
# alone): eager times of a call are dominated by the host's launch work on most shapes and vary with the host.
KERNEL_CONFIGS = [
    {},
    dict(num_stages=1),
    dict(distance_programs_per_sm=4),
    dict(distance_programs_per_sm=2),
    dict(programs_per_sm=4),
    dict(programs_per_sm=8),
    dict(programs_per_sm=12),
    dict(programs_per_sm=16),
    dict(gather_block=64),
    dict(num_warps=8),
    dict(hist_block_elements=2048),
    dict(block_n=256),
    dict(block_n=2048),
]


def bench_ms(fn, smoke: bool) -> float:
    """Median time of `fn` in milliseconds."""
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_ceiling_gbps(device: torch.device, smoke: bool) -> float:
    """Device-to-device copy bandwidth, counting the bytes read and written."""
    numel = (1 << 20) if smoke else (1 << 30)  # 2 GiB of bf16: far beyond the L2
    src = torch.randn(numel, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), smoke)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def sdpa_layouts(query, key, value, group: int) -> dict:
    """SDPA calls of a decode step: plain, and for GQA with `enable_gqa` or with the heads folded into q_len."""
    batch, num_heads, _, dim = query.shape
    if group == 1:
        return {"mha": lambda: F.scaled_dot_product_attention(query, key, value)}
    folded_query = query.view(batch, key.shape[1], group, dim)  # one query position: heads folded into q_len
    return {
        "enable_gqa": lambda: F.scaled_dot_product_attention(query, key, value, enable_gqa=True),
        "folded": lambda: F.scaled_dot_product_attention(folded_query, key, value).view(batch, num_heads, 1, -1),
    }


def sdpa_callable(query, key, value, group: int, name: str):
    """The SDPA call `backend/layout` as a function that selects its backend itself."""
    from torch.nn.attention import sdpa_kernel

    backend_name, layout_name = name.split("/")
    backend = sdpa_backends(False)[backend_name]
    fn = sdpa_layouts(query, key, value, group)[layout_name]

    def run():
        with sdpa_kernel([backend]):
            return fn()

    return run


def sdpa_times(query, key, value, group: int, smoke: bool) -> dict[str, float | str]:
    """Time of each SDPA backend (and GQA layout) that runs; the error text of those that do not."""
    from torch.nn.attention import sdpa_kernel

    times: dict[str, float | str] = {}
    for backend_name, backend in sdpa_backends(smoke).items():
        for layout_name, fn in sdpa_layouts(query, key, value, group).items():
            name = f"{backend_name}/{layout_name}"
            try:
                with sdpa_kernel([backend]):
                    fn()
                    times[name] = bench_ms(fn, smoke)
            except RuntimeError as error:
                times[name] = f"unsupported: {str(error).splitlines()[0][:160]}"
    return times


def kernel_breakdown(fn) -> dict[str, float]:
    """Mean CUDA time per launch of each kernel of `fn`, in microseconds (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for event in prof.key_averages():
        device_time = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if event.count and device_time:
            rows[event.key[:60]] = round(device_time / 20, 2)
    return dict(sorted(rows.items(), key=lambda item: -item[1]))


def run_shape(shape: Shape, device: torch.device, ceiling_gbps: float, smoke: bool) -> dict:
    print(f"\n== {shape.name}: N = {shape.top_n}", flush=True)
    generator = torch.Generator(device=device).manual_seed(0)
    b, hq, hkv, d, n = shape.batch, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.num_keys
    dtype = torch.bfloat16
    query = torch.randn(b, hq, 1, d, device=device, generator=generator).to(dtype)
    key = torch.randn(b, hkv, n, d, device=device, generator=generator).to(dtype)
    value = torch.randn(b, hkv, n, d, device=device, generator=generator).to(dtype)
    alpha = 1.0 / math.sqrt(d)
    key_words = triton_pack_sign_bits(key)
    result: dict = {"shape": asdict(shape), "top_n": shape.top_n}

    # correctness first: exact kept sets, output against the float64 reference
    out, keep = hamming_topk_decode(query, key_words, value, None, shape.top_n, alpha, return_keep=True)
    ref_out, ref_keep = reference_hamming_topk_attention(
        query, key_words, value.double(), None, shape.top_n, alpha, return_keep=True
    )
    result["kept_sets_equal"] = bool(torch.equal(keep, ref_keep))
    result["pack_equal_torch"] = bool(torch.equal(key_words, pack_sign_bits(key)))
    result["relative_error_vs_float64"] = float((out.double() - ref_out).norm() / ref_out.norm())
    # value rows the kernel loads: kept by any query head of a key/value head
    kept_rows = int(keep.view(b, hkv, shape.group, n).any(dim=2).sum())
    del ref_out, ref_keep
    print(
        f"kept sets equal: {result['kept_sets_equal']}, relative error vs float64: "
        f"{result['relative_error_vs_float64']:.2e}",
        flush=True,
    )

    io_bytes = 2 * b * hq * d * 2  # query in, output out (bf16)
    sdpa_bytes = 2 * b * hkv * n * d * 2 + io_bytes
    had_floor_bytes = b * hkv * n * d // 8 + b * hq * shape.top_n * d * 2 + io_bytes
    had_moved_bytes = b * hkv * n * d // 8 + 2 * b * hq * n + kept_rows * d * 2 + io_bytes  # + codes written/read
    result["bytes"] = {"sdpa": sdpa_bytes, "had_floor": had_floor_bytes, "had_kernel_estimate": had_moved_bytes}

    sdpa = sdpa_times(query, key, value, shape.group, smoke)
    result["sdpa_ms"] = sdpa
    timed = {name: ms for name, ms in sdpa.items() if isinstance(ms, float)}
    best_sdpa = min(timed, key=timed.get)
    result["sdpa_best"] = {"backend": best_sdpa, "ms": timed[best_sdpa]}

    sweep = []
    configs = KERNEL_CONFIGS[:2] if smoke else KERNEL_CONFIGS
    for options in configs:
        try:
            call = lambda o=options: hamming_topk_decode(query, key_words, value, None, shape.top_n, alpha, **o)  # noqa: E731
            check = call()
            ms = bench_ms(call, smoke)
            row = {"options": options, "ms": ms, "equal_to_default": bool(torch.equal(check, out))}
            if not smoke:
                row["graph_ms"] = float(triton.testing.do_bench_cudagraph(call, rep=50, return_mode="median"))
            sweep.append(row)
        except Exception as error:  # a configuration a Triton version cannot compile is reported, not fatal
            sweep.append({"options": options, "error": f"{type(error).__name__}: {str(error)[:200]}"})
        print(
            f"  kernel {options or 'default'}: {sweep[-1].get('ms', sweep[-1].get('error'))} "
            f"(graph {sweep[-1].get('graph_ms')})",
            flush=True,
        )
    result["kernel_sweep"] = sweep
    best = min((row for row in sweep if "ms" in row), key=lambda row: row.get("graph_ms", row["ms"]))
    result["kernel_best"] = best
    # the sweep compares timings; check the winner's selection too
    _, best_keep = hamming_topk_decode(
        query, key_words, value, None, shape.top_n, alpha, return_keep=True, **best["options"]
    )
    result["kernel_best_kept_sets_equal"] = bool(torch.equal(best_keep, keep))
    del best_keep
    result["kernel_default_ms"] = sweep[0].get("ms")
    if not smoke:
        best_fn = lambda: hamming_topk_decode(query, key_words, value, None, shape.top_n, alpha, **best["options"])  # noqa: E731
        result["kernel_breakdown_us"] = kernel_breakdown(best_fn)
        default_fn = lambda: hamming_topk_decode(query, key_words, value, None, shape.top_n, alpha)  # noqa: E731
        result["kernel_breakdown_default_us"] = kernel_breakdown(default_fn)
        # host time per call when nothing waits for the GPU: above the GPU time, the launches are the bottleneck
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            best_fn()
        result["host_us_per_call"] = (time.perf_counter() - start) / 50 * 1e6
        torch.cuda.synchronize()
        # CUDA-graph replay hides the Python launch overhead (no L2 flush between replays: a lower bound)
        sdpa_fn = sdpa_callable(query, key, value, shape.group, best_sdpa)
        result["cuda_graph_ms"] = {
            "kernel": float(triton.testing.do_bench_cudagraph(best_fn, rep=100, return_mode="median")),
            "sdpa": float(triton.testing.do_bench_cudagraph(sdpa_fn, rep=100, return_mode="median")),
        }
        result["speedup_graph"] = result["cuda_graph_ms"]["sdpa"] / result["cuda_graph_ms"]["kernel"]

    result["reference_ms"] = bench_ms(
        lambda: reference_hamming_topk_attention(query, key_words, value, None, shape.top_n, alpha), smoke
    )
    kernel_ms = best["ms"]
    result["speedup_vs_best_sdpa"] = timed[best_sdpa] / kernel_ms
    result["speedup_vs_reference"] = result["reference_ms"] / kernel_ms
    result["bandwidth_gbps"] = {
        "sdpa": sdpa_bytes / (timed[best_sdpa] * 1e-3) / 1e9,
        "had_floor_bytes": had_floor_bytes / (kernel_ms * 1e-3) / 1e9,
        "had_kernel_estimate": had_moved_bytes / (kernel_ms * 1e-3) / 1e9,
        "copy_ceiling": ceiling_gbps,
    }
    result["byte_ratio_sdpa_over_had_floor"] = sdpa_bytes / had_floor_bytes
    print(
        f"best sdpa {best_sdpa}: {timed[best_sdpa] * 1e3:.1f} us | kernel: {kernel_ms * 1e3:.1f} us "
        f"({result['speedup_vs_best_sdpa']:.2f}x) | reference: {result['reference_ms'] * 1e3:.1f} us | "
        f"graphs: {result.get('cuda_graph_ms')} | host us/call: {result.get('host_us_per_call')} | "
        f"breakdown (us): {result.get('kernel_breakdown_us')}",
        flush=True,
    )
    return result


def print_table(results: list[dict]) -> None:
    print(
        "\n| shape | N | best SDPA (us) | HAD kernel (us) | speedup | speedup in CUDA graphs | HAD PyTorch (us) | SDPA GB/s | HAD GB/s (floor bytes) | kept sets equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        bw = r["bandwidth_gbps"]
        print(
            f"| {r['shape']['name']} | {r['top_n']} | {r['sdpa_best']['ms'] * 1e3:.1f} ({r['sdpa_best']['backend']}) "
            f"| {r['kernel_best']['ms'] * 1e3:.1f} | {r['speedup_vs_best_sdpa']:.2f}x | {r.get('speedup_graph', float('nan')):.2f}x | {r['reference_ms'] * 1e3:.0f} "
            f"| {bw['sdpa']:.0f} | {bw['had_floor_bytes']:.0f} | {r['kept_sets_equal']} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode.json")
    parser.add_argument("--shapes", nargs="*", help="names of the shapes to run (default: all)")
    parser.add_argument("--skip-e2e", action="store_true", help="skip the generate() figure")
    parser.add_argument("--e2e-context", type=int, default=32768)
    parser.add_argument("--e2e-new-tokens", type=int, default=64)
    parser.add_argument("--e2e-batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = [shape for shape in shapes if shape.name in args.shapes]
    import transformers

    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "timing": "triton.testing.do_bench, median of ~100 ms of runs after 25 ms warm-up, L2 flushed per run",
        "top_n_ratio": TOP_N_RATIO,
        "query_len": 1,
        "dtype": "bfloat16",
    }
    report["copy_ceiling_gbps"] = copy_ceiling_gbps(device, args.smoke)
    print(f"device-to-device copy: {report['copy_ceiling_gbps']:.0f} GB/s", flush=True)
    report["shapes"] = []
    for shape in shapes:
        report["shapes"].append(run_shape(shape, device, report["copy_ceiling_gbps"], args.smoke))
        torch.cuda.empty_cache() if device.type == "cuda" else None
        _write(args.out, report)
    print_table(report["shapes"])

    attention_module = ROOT / "src" / "had_hf" / "attention.py"
    if not args.skip_e2e and attention_module.exists():
        report["end_to_end"] = []
        for batch in args.e2e_batch:
            try:
                context, new_tokens = (64, 4) if args.smoke else (args.e2e_context, args.e2e_new_tokens)
                report["end_to_end"].append(run_e2e(context, new_tokens, batch, device, TOP_N_RATIO, tiny=args.smoke))
            except Exception as error:  # report what failed; the kernel results above stay
                report["end_to_end"].append({"batch": batch, "error": f"{type(error).__name__}: {error}"[:500]})
                print(f"end to end failed: {error}", flush=True)
            torch.cuda.empty_cache() if device.type == "cuda" else None
            _write(args.out, report)
    _write(args.out, report)
    ok = all(r["kept_sets_equal"] and r["kernel_best_kept_sets_equal"] for r in report["shapes"])
    print(f"\nwrote {args.out}; kept sets equal at every shape: {ok}")
    return 0 if ok else 1


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
