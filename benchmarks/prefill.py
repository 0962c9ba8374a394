"""Prefill attention on one GPU: HAD's Triton prefill kernel against the best SDPA backend and the PyTorch HAD path.

    PYTHONPATH=src python benchmarks/prefill.py --out benchmarks/results/prefill.json

For each shape (bf16 queries/keys/values, N = ceil(0.117 n) kept keys per row, alpha = 1/sqrt(d)) it
1. checks the kernel's kept key sets against the PyTorch reference (exactly) on the last rows (all rows up to 4k
   positions, 256 beyond; the queries are the last positions, so causal rows keep their offsets), and the output's
   relative error against float64 values;
2. times (`triton.testing.do_bench`, median, L2 flushed) and measures the peak memory (`max_memory_allocated` during
   one call; both in `prefill_measure.py`) of: torch SDPA under each of the flash, cuDNN and memory-efficient backends
   that run; the kernel's whole call; each of its parts alone (the ±1 key conversion, the threshold pass, the attend
   pass); the floors of the two passes (threshold: the score tiles and their row maximum without counting; attend: a
   dense softmax of every valid key with a known maximum, FlashAttention's work without its rescaling); the threshold
   pass with int8 dots and with XOR/popcount scores and the attend pass with int8 dots; a small sweep of launch
   settings per pass; and the PyTorch path (`reference_hamming_topk_attention`) where it fits (n <= 32k; an
   out-of-memory error is recorded);
3. reports speedup = best SDPA time / kernel time (same run) and the peak memory of each.

One command runs everything: several minutes (an estimate: about 60 kernel variants to compile, and the PyTorch
path at 16k and 32k keys); `--shapes` picks rows and `--append` merges them into an existing results file, to split
the run under a time limit, and `--skip-sweep` drops the launch-setting sweep. `--smoke` runs tiny shapes on
the CPU through Triton's interpreter (set TRITON_INTERPRET=1), to test this script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import triton  # noqa: E402

from had_hf.kernels import reference_hamming_topk_attention  # noqa: E402
from had_hf.kernels.triton_prefill import (  # noqa: E402
    default_prefill_config,
    hamming_topk_prefill,
    prefill_attend_pass,
    prefill_threshold_pass,
    prepare_prefill,
)

sys.path.insert(0, str(ROOT / "benchmarks"))
from prefill_measure import bench_ms, bench_slow, error_text, peak_bytes, run_sdpa  # noqa: E402

TOP_N_RATIO = 0.117
REFERENCE_MAX_KEYS = 32768  # the PyTorch path's time grows with n^2 (and its causal mask with q x n bytes)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    n: int
    causal: bool

    @property
    def top_n(self) -> int:
        return math.ceil(TOP_N_RATIO * self.n)


SHAPES = [
    Shape("B1-H12-d64-n4k", 1, 12, 12, 64, 4096, False),
    Shape("B1-H12-d64-n16k", 1, 12, 12, 64, 16384, False),
    Shape("B1-H12-d64-n32k", 1, 12, 12, 64, 32768, False),
    Shape("B1-H12-d64-n128k", 1, 12, 12, 64, 131072, False),
    Shape("GQA-B1-H32/8-d128-n16k-causal", 1, 32, 8, 128, 16384, True),
    Shape("GQA-B1-H32/8-d128-n64k-causal", 1, 32, 8, 128, 65536, True),
    Shape("BERT-B64-H12-d64-n512", 64, 12, 12, 64, 512, False),
]
SMOKE_SHAPES = [
    Shape("smoke-mha", 1, 1, 1, 32, 48, False),
    Shape("smoke-gqa-causal", 1, 2, 1, 64, 32, True),
    Shape("smoke-encoder-batch", 2, 1, 1, 32, 32, False),
]

# launch variants of each pass alone (the first: the default); the best is reported, the default is what the
# package runs
THRESHOLD_SWEEP = [
    {},
    {"block_m": 64, "threshold_warps": 4},
    {"block_n": 128},
    {"block_n": 32},
    {"threshold_warps": 4},
    {"threshold_warps": 8},
    {"threshold_stages": 2},
    {"threshold_stages": 4},
    {"sample_tiles": 4},
    {"sample_tiles": 16},
]
ATTEND_SWEEP = [
    {},
    {"attend_block_n": 128},
    {"attend_block_n": 32},
    {"attend_block_m": 64, "attend_warps": 4},
    {"attend_warps": 4},
    {"attend_stages": 2},
    {"attend_stages": 4},
]
# the threshold pass with int8 ±1 dots (int32 scores) and with XOR/popcount of packed sign words, the attend pass
# with fp16 dots (the default's int8 dots give int32 scores, converted to fp32); tile shapes that ptxas compiles
# without spilling where there is one (popcount spills at every shape tried: the variant is here to show its order
# of magnitude)
SCORE_MODES = [
    ("threshold", {"score_mode": "dot8"}),
    ("threshold", {"score_mode": "dot8", "block_n": 32}),
    ("threshold", {"score_mode": "popcount", "block_m": 64}),
    ("attend", {"attend_mode": "dot16"}),
]


def make_inputs(shape: Shape, device: torch.device, rows: int | None = None):
    """Random normal bf16 tensors (queries: the last `rows` positions), and num_kept (B, 1, q) = min(N, valid keys)."""
    generator = torch.Generator(device=device).manual_seed(shape.n + shape.num_heads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = shape.n if rows is None else rows
    b, hq, hkv, d, n = shape.batch, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.n
    key = torch.randn(b, hkv, n, d, device=device, generator=generator).to(dtype)
    value = torch.randn(b, hkv, n, d, device=device, generator=generator).to(dtype)
    query = torch.randn(b, hq, q, d, device=device, generator=generator).to(dtype)
    positions = torch.arange(q, device=device) + (n - q)
    valid_counts = positions + 1 if shape.causal else torch.full((q,), n, device=device)
    num_kept = valid_counts.clamp(max=shape.top_n).to(torch.int32).view(1, 1, q)
    return query, key, value, num_kept


def check_rows(shape: Shape, device: torch.device, alpha: float) -> dict:
    """Kept sets of the kernel against the PyTorch path on the last rows (exact), output error against float64."""
    rows = shape.n if shape.n <= 4096 else 256
    query, key, value, num_kept = make_inputs(shape, device, rows)
    valid = None
    if shape.causal:
        positions = torch.arange(rows, device=device)[:, None] + (shape.n - rows)
        valid = (torch.arange(shape.n, device=device)[None, :] <= positions).view(1, 1, rows, shape.n)
    out, keep = hamming_topk_prefill(query, key, value, None, shape.causal, num_kept, alpha, return_keep=True)
    ref, ref_keep = reference_hamming_topk_attention(
        query, key, value.double(), valid, shape.top_n, alpha, return_keep=True
    )
    error = float((out.double() - ref).norm() / ref.norm())
    result = {"rows_checked": rows, "kept_sets_equal": bool(torch.equal(keep, ref_keep))}
    result["relative_error_vs_float64"] = error
    result["kept_per_row_min_max"] = [int(keep.sum(-1).min()), int(keep.sum(-1).max())]
    return result


def run_shape(shape: Shape, device: torch.device, smoke: bool, sweep: bool) -> dict:
    print(f"\n== {shape.name}: N = {shape.top_n}", flush=True)
    alpha = 1.0 / math.sqrt(shape.head_dim)
    row: dict = {
        "name": shape.name,
        "batch": shape.batch,
        "num_heads": shape.num_heads,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "n": shape.n,
        "causal": shape.causal,
        "top_n": shape.top_n,
    }
    row.update(check_rows(shape, device, alpha))
    print(f"kept sets equal: {row['kept_sets_equal']} ({row['rows_checked']} rows), relative error "
          f"{row['relative_error_vs_float64']:.2e}", flush=True)  # fmt: skip
    if not smoke:
        torch.cuda.empty_cache()

    query, key, value, num_kept = make_inputs(shape, device)
    times: dict = {}
    peaks: dict = {}
    sdpa_times, sdpa_peaks = run_sdpa(query, key, value, shape.causal, smoke)
    times["sdpa"] = sdpa_times
    timed = {name: ms for name, ms in sdpa_times.items() if isinstance(ms, float)}
    best = min(timed, key=timed.get)
    row["sdpa_best"] = {"backend": best, "ms": timed[best]}
    peaks["sdpa_best"] = sdpa_peaks.get(best)
    peaks["sdpa"] = sdpa_peaks

    def call():
        return hamming_topk_prefill(query, key, value, None, shape.causal, num_kept, alpha)

    call()
    times["had_kernel"] = bench_ms(call, smoke)
    peaks["had_kernel"] = peak_bytes(call, smoke)
    config = default_prefill_config(shape.head_dim, shape.head_dim, shape.n, smoke)
    row["config"] = dataclasses.asdict(config)

    def prepared(changes: dict):
        return prepare_prefill(query, key, value, None, shape.causal, num_kept, alpha,
                               dataclasses.replace(config, **changes))  # fmt: skip

    prep = prepared({})
    stats = prefill_threshold_pass(prep)
    times["prepare"] = bench_ms(lambda: prepared({}), smoke)
    times["threshold_pass"] = bench_ms(lambda: prefill_threshold_pass(prep), smoke)
    times["attend_pass"] = bench_ms(lambda: prefill_attend_pass(prep, stats), smoke)
    times["floors"] = {
        "threshold_scores_only": bench_ms(lambda: prefill_threshold_pass(prep, count=False), smoke),
        "attend_dense_softmax": bench_ms(lambda: prefill_attend_pass(prep, stats, select=False), smoke),
    }
    reference_out = prefill_attend_pass(prep, stats)

    def variant(kind: str, changes: dict) -> dict:
        entry: dict = {"options": changes}
        try:
            variant_prep = prepared(changes)
            if kind == "threshold":
                variant_stats = prefill_threshold_pass(variant_prep)
                entry["same_stats"] = bool(torch.equal(variant_stats, stats))
                entry["ms"] = bench_ms(lambda: prefill_threshold_pass(variant_prep), smoke)
            else:
                variant_out = prefill_attend_pass(variant_prep, stats)
                entry["max_abs_diff_vs_default"] = float((variant_out.float() - reference_out.float()).abs().max())
                entry["ms"] = bench_ms(lambda: prefill_attend_pass(variant_prep, stats), smoke)
        except Exception as error:  # a variant a Triton version cannot compile or run is reported, not fatal
            entry["error"] = error_text(error)
        return entry

    # (smoke runs skip popcount: slow in the interpreter, and tested by the interpreter cases)
    modes = [mode for mode in SCORE_MODES if not (smoke and mode[1].get("score_mode") == "popcount")]
    times["score_modes"] = [{"pass": kind, **variant(kind, changes)} for kind, changes in modes]
    if sweep:
        last = 2 if smoke else None  # smoke runs: one variant of each
        row["sweep"] = {
            "threshold": [variant("threshold", changes) for changes in THRESHOLD_SWEEP[1:last]],
            "attend": [variant("attend", changes) for changes in ATTEND_SWEEP[1:last]],
        }
        best_parts = {}
        for kind, default_ms in (("threshold", times["threshold_pass"]), ("attend", times["attend_pass"])):
            ok = [entry for entry in row["sweep"][kind] if "ms" in entry]
            winner = min(ok, key=lambda entry: entry["ms"], default=None)
            best_parts[kind] = winner if winner and winner["ms"] < default_ms else {"options": {}, "ms": default_ms}
        row["sweep_best"] = best_parts
        row["sweep_best_sum_ms"] = times["prepare"] + sum(part["ms"] for part in best_parts.values())

    if shape.n <= REFERENCE_MAX_KEYS:
        valid = None
        if shape.causal:
            positions = torch.arange(shape.n, device=device)
            valid = (positions[None, :] <= positions[:, None]).view(1, 1, shape.n, shape.n)

        def pytorch_path():
            return reference_hamming_topk_attention(query, key, value, valid, shape.top_n, alpha)

        try:
            times["pytorch"], peaks["pytorch"] = bench_slow(pytorch_path, smoke)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            times["pytorch"] = peaks["pytorch"] = f"failed: {error_text(error)}"
        del valid
    else:
        times["pytorch"] = peaks["pytorch"] = f"skipped: n > {REFERENCE_MAX_KEYS}"
    if not smoke:
        torch.cuda.empty_cache()

    row["times_ms"] = times
    row["peak_memory_bytes"] = peaks
    input_bytes = sum(t.numel() * t.element_size() for t in (query, key, value))
    row["input_bytes"] = input_bytes
    row["speedup"] = timed[best] / times["had_kernel"]
    row["pass_share_of_kernel"] = {
        part: times[part] / times["had_kernel"] for part in ("prepare", "threshold_pass", "attend_pass")
    }
    print(
        f"best sdpa {best}: {timed[best]:.3f} ms | HAD kernel {times['had_kernel']:.3f} ms "
        f"(speedup {row['speedup']:.2f}x; prepare {times['prepare']:.3f}, threshold {times['threshold_pass']:.3f}, "
        f"attend {times['attend_pass']:.3f}; floors {times['floors']}) | pytorch {times['pytorch']} | "
        f"peak bytes {peaks['had_kernel']} vs sdpa {peaks['sdpa_best']} vs pytorch {peaks['pytorch']}",
        flush=True,
    )
    return row


def _fmt_ms(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "-"


def _fmt_gib(value) -> str:
    return f"{value / 2**30:.2f}" if isinstance(value, int) else "-"


def print_table(rows: list[dict]) -> None:
    print(
        "\n| shape | N | best SDPA ms | HAD ms | speedup | threshold ms (floor) | attend ms (floor) | PyTorch ms | "
        "peak GiB SDPA / HAD / PyTorch | kept sets equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, p = r["times_ms"], r["peak_memory_bytes"]
        print(
            f"| {r['name']} | {r['top_n']} | {r['sdpa_best']['ms']:.3f} ({r['sdpa_best']['backend']}) | "
            f"{t['had_kernel']:.3f} | {r['speedup']:.2f}x | {t['threshold_pass']:.3f} "
            f"({t['floors']['threshold_scores_only']:.3f}) | {t['attend_pass']:.3f} "
            f"({t['floors']['attend_dense_softmax']:.3f}) | {_fmt_ms(t['pytorch'])} | {_fmt_gib(p['sdpa_best'])} / "
            f"{_fmt_gib(p['had_kernel'])} / {_fmt_gib(p['pytorch'])} | {r['kept_sets_equal']} |"
        )


def machine(device: torch.device) -> dict:
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory)
    else:
        info["gpu"] = None
        info["note"] = "smoke run: CPU, Triton interpreter; times are not meaningful"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefill.json")
    parser.add_argument("--shapes", nargs="*", help="names of the shapes to run (default: all)")
    parser.add_argument("--append", action="store_true", help="keep the other shapes' rows of an existing --out")
    parser.add_argument("--skip-sweep", action="store_true", help="no launch-setting sweep (faster)")
    parser.add_argument(
        "--smoke", "--dry-run", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)"
    )
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        unknown = set(args.shapes) - {shape.name for shape in shapes}
        if unknown:
            parser.error(f"unknown shapes {sorted(unknown)}; known: {[shape.name for shape in shapes]}")
        shapes = [shape for shape in shapes if shape.name in args.shapes]
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(device),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "python": platform.python_version(),
        },
        "timing": "triton.testing.do_bench, median of ~100 ms of runs after 25 ms warm-up, L2 flushed per run; "
        "the PyTorch path: one run after one warm-up",
        "peak_memory": "torch.cuda.max_memory_allocated during one call, inputs included",
        "top_n_ratio": TOP_N_RATIO,
        "dtype": "bfloat16",
        "alpha": "1/sqrt(head_dim)",
        "rows": [],
    }
    if args.append and args.out.exists():
        previous = json.loads(args.out.read_text())
        names = {shape.name for shape in shapes}
        report["rows"] = [row for row in previous.get("rows", []) if row["name"] not in names]
        report["earlier_commands"] = previous.get("earlier_commands", []) + [previous.get("command")]
    for shape in shapes:
        try:
            report["rows"].append(run_shape(shape, device, args.smoke, sweep=not args.skip_sweep or args.smoke))
        except torch.OutOfMemoryError as error:  # recorded; the other shapes still run
            report.setdefault("failed", []).append({"name": shape.name, "error": error_text(error)})
            print(f"{shape.name} failed: {error}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _write(args.out, report)
    order = {shape.name: index for index, shape in enumerate(SHAPES + SMOKE_SHAPES)}
    report["rows"].sort(key=lambda row: order.get(row["name"], len(order)))
    _write(args.out, report)
    print_table(report["rows"])
    ok = all(row["kept_sets_equal"] for row in report["rows"]) and not report.get("failed")
    print(f"\nwrote {args.out}; kept sets equal at every shape: {ok}")
    return 0 if ok else 1


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
