"""What the decode kernels' memory traffic can cost at best on this GPU: measured floors, not byte counts.

    PYTHONPATH=src python benchmarks/decode_floors.py --out benchmarks/results/decode_floors.json

The issue's byte floor divides bytes by the copy bandwidth. Two of HAD's streams are not copies:
1. the key bits: a stream of d/8 bytes per key, each turned into a one-byte distance ("code") that is written back;
   measured with minimal Triton kernels (no histogram, no selection), reading the keys as int32 words or int64;
2. the kept value rows: a gather of N random rows of 2 dv bytes out of n. Measured with a minimal Triton kernel that
   sums the rows of given index lists (the kept sets of the real kernel, cut into one list per program, ascending as
   the kernel's are), over a sweep of tile sizes, warps, pipelining stages and programs per (batch, kv head), and
   with torch's `index_select` of the same rows.
Then the decode kernels' own per-kernel times (torch profiler) at the same shapes, for the comparison. CUDA only.
`--profile-only` makes one decode call per shape, for `ncu`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra import libdevice  # noqa: E402

from had_hf.kernels.triton_decode import hamming_topk_decode, triton_pack_sign_bits  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from decode import SHAPES, kernel_breakdown  # noqa: E402


@triton.jit
def _stream_keys_kernel(
    k_ptr, code_ptr, keys_per_program, q0, q1, WIDE: tl.constexpr, BLOCK: tl.constexpr, STORE: tl.constexpr
):
    """d = 64 keys as one int64 each (WIDE; query q0) or two int32 words (queries q0, q1): distance to a fixed query,
    one byte per key written (or summed)."""
    start = tl.program_id(0).to(tl.int64) * keys_per_program
    total = tl.zeros((BLOCK,), dtype=tl.int32)
    for block in range(0, keys_per_program, BLOCK):
        offs = start + block + tl.arange(0, BLOCK)
        if WIDE:
            dist = libdevice.popc(tl.load(k_ptr + offs) ^ q0)
        else:
            dist = libdevice.popc(tl.load(k_ptr + 2 * offs) ^ q0) + libdevice.popc(tl.load(k_ptr + 2 * offs + 1) ^ q1)
        if STORE:
            tl.store(code_ptr + offs, dist.to(tl.uint8))
        else:
            total += dist
    if not STORE:
        tl.store(code_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), total.to(tl.uint8))


@triton.jit
def _gather_sum_kernel(
    v_ptr, index_ptr, count_ptr, out_ptr, capacity, DV: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr
):
    """Sums the value rows (global row indices) of this program's list: the gather phase and nothing else."""
    pid = tl.program_id(0)
    count = tl.load(count_ptr + pid)
    base = index_ptr + pid.to(tl.int64) * capacity
    offs_d = tl.arange(0, DV)
    acc = tl.zeros((BLOCK_K, DV), dtype=tl.float32)
    for k0 in tl.range(0, count, BLOCK_K, num_stages=STAGES):
        slots = k0 + tl.arange(0, BLOCK_K)
        ok = slots < count
        index = tl.load(base + slots, mask=ok, other=0)
        rows = tl.load(v_ptr + index[:, None].to(tl.int64) * DV + offs_d[None, :], mask=ok[:, None], other=0.0)
        acc += rows.to(tl.float32)
    tl.store(out_ptr + pid * DV + offs_d, tl.sum(acc, axis=0))


def _time(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")) * 1e3  # us


def key_stream_floors(num_keys: int, device) -> list[dict]:
    words = torch.randint(-(2**31), 2**31 - 1, (num_keys, 2), dtype=torch.int32, device=device)
    wide_words = words.view(torch.int64).view(-1)
    codes = torch.empty(num_keys, dtype=torch.uint8, device=device)
    rows = []
    for kind, store, block, warps, per_program in itertools.product(
        ("int32x2", "int64"), (True, False), (1024, 2048), (4, 8), (8192, 32768)
    ):
        grid = (num_keys // per_program,)
        wide = kind == "int64"
        keys, q0, q1 = (wide_words, 0x123456787654321, 0) if wide else (words, 0x1234567, 0x7654321)

        def fn(grid=grid, keys=keys, q0=q0, q1=q1, wide=wide, store=store, block=block, warps=warps,
               per_program=per_program):  # fmt: skip
            _stream_keys_kernel[grid](keys, codes, per_program, q0, q1, WIDE=wide, BLOCK=block, STORE=store,
                                      num_warps=warps)  # fmt: skip

        us = _time(fn)
        moved = num_keys * 8 + (num_keys if store else 0)
        rows.append(dict(words=kind, store_codes=store, block=block, num_warps=warps, keys_per_program=per_program,
                         us=round(us, 2), gbps=round(moved / us / 1e3, 1)))  # fmt: skip
        print("keys", rows[-1], flush=True)
    return rows


def _decode_inputs(shape, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded bf16 query and values, and the packed sign bits of seeded bf16 keys, at `shape`."""
    generator = torch.Generator(device=device).manual_seed(0)
    b, hq, hkv, d, n = shape.batch, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.num_keys
    query = torch.randn(b, hq, 1, d, device=device, generator=generator).to(torch.bfloat16)
    key = torch.randn(b, hkv, n, d, device=device, generator=generator).to(torch.bfloat16)
    value = torch.randn(b, hkv, n, d, device=device, generator=generator).to(torch.bfloat16)
    return query, triton_pack_sign_bits(key), value


def gather_floors(shape, device) -> dict:
    """Kept rows of the real kernel at this shape, then the gather floor over a sweep of launch options."""
    b, hkv, d, n = shape.batch, shape.num_kv_heads, shape.head_dim, shape.num_keys
    query, key_words, value = _decode_inputs(shape, device)
    call = lambda: hamming_topk_decode(query, key_words, value, None, shape.top_n, 1.0 / math.sqrt(d))  # noqa: E731
    _, keep = hamming_topk_decode(query, key_words, value, None, shape.top_n, 1.0 / math.sqrt(d), return_keep=True)
    rows_kept = keep.view(b * hkv, shape.group, n).any(dim=1)  # (b * hkv, n): value rows a kv head loads
    kept = int(rows_kept.sum())
    kept_at = rows_kept.nonzero()
    flat_index = (kept_at[:, 0] * n + kept_at[:, 1]).to(torch.int32)
    flat_value = value.view(b * hkv * n, d)
    gathered_bytes = kept * d * 2
    result = {"shape": shape.name, "kept_rows": kept, "kept_fraction": kept / (b * hkv * n),
              "gathered_bytes": gathered_bytes, "sweep": []}  # fmt: skip
    result["index_select_us"] = round(_time(lambda: flat_value.index_select(0, flat_index.long())), 2)
    print(shape.name, "index_select", result["index_select_us"], flush=True)
    per_head = rows_kept.sum(dim=1)
    for programs_per_head in (8, 32, 132 * 8 // (b * hkv) or 1):
        # each kv head's kept rows cut into programs_per_head consecutive pieces (ascending, as the kernel lists them)
        capacity = int(per_head.max()) // programs_per_head + 64
        index = torch.zeros(b * hkv * programs_per_head, capacity, dtype=torch.int32, device=device)
        counts = torch.zeros(b * hkv * programs_per_head, dtype=torch.int32, device=device)
        offsets = torch.cumsum(per_head, 0) - per_head
        for head in range(b * hkv):
            rows = flat_index[offsets[head] : offsets[head] + per_head[head]]
            for p, piece in enumerate(torch.tensor_split(rows, programs_per_head)):
                index[head * programs_per_head + p, : piece.numel()] = piece
                counts[head * programs_per_head + p] = piece.numel()
        out = torch.empty(index.shape[0], d, dtype=torch.float32, device=device)
        for block_k, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2, 3)):
            grid = (index.shape[0],)

            def fn(grid=grid, index=index, counts=counts, out=out, capacity=capacity, block_k=block_k,
                   stages=stages, warps=warps):  # fmt: skip
                _gather_sum_kernel[grid](flat_value, index, counts, out, capacity, DV=d, BLOCK_K=block_k,
                                         STAGES=stages, num_warps=warps)  # fmt: skip

            try:
                us = _time(fn)
            except Exception as error:  # noqa: BLE001
                result["sweep"].append({"error": str(error)[:200]})
                continue
            result["sweep"].append(
                dict(
                    programs_per_kv_head=programs_per_head,
                    block_k=block_k,
                    num_warps=warps,
                    stages=stages,
                    us=round(us, 2),
                    gbps=round(gathered_bytes / us / 1e3, 1),
                )
            )
        best = min((r for r in result["sweep"] if "us" in r), key=lambda r: r["us"])
        print(shape.name, "gather best so far", best, flush=True)
    result["gather_best"] = min((r for r in result["sweep"] if "us" in r), key=lambda r: r["us"])
    result["kernel_breakdown_us"] = kernel_breakdown(call)
    result["kernel_graph_us"] = round(
        float(triton.testing.do_bench_cudagraph(call, rep=50, return_mode="median")) * 1e3, 2
    )
    print(shape.name, result["gather_best"], result["kernel_breakdown_us"], result["kernel_graph_us"], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/decode_floors.json"))
    parser.add_argument("--profile-only", action="store_true", help="one decode call per shape (for ncu)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("decode_floors.py measures a CUDA GPU (libdevice popcount, HBM bandwidth): none was found.")
    device = torch.device("cuda")
    if args.profile_only:
        for shape in (SHAPES[1], SHAPES[3]):
            query, key_words, value = _decode_inputs(shape, device)
            hamming_topk_decode(query, key_words, value, None, shape.top_n, 1.0 / math.sqrt(shape.head_dim))
            torch.cuda.synchronize()
        return
    props = torch.cuda.get_device_properties(device)
    result = {
        "command": "PYTHONPATH=src python benchmarks/decode_floors.py --out $OUT/decode_floors.json",
        "gpu": props.name,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "key_stream_8M_keys": key_stream_floors(8 * 16 * 65536, device),
        "gather": [gather_floors(SHAPES[1], device), gather_floors(SHAPES[3], device)],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
