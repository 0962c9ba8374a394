"""Host (Python) time of one `hamming_topk_decode` call with the three Triton launches replaced by no-ops.

In decode the host must issue a step's kernels faster than the GPU runs them; on the H200 the host time of a call
(230-370 us, `decode.md`) exceeded the kernels' GPU time on most shapes. This measures the part of it that is
had_hf's own Python (argument checks, split planning, workspace views), without a GPU: CPU tensors, kernels stubbed.

    python benchmarks/decode_host_overhead.py --out benchmarks/results/decode_host_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

SHAPES = [  # (name, batch, query heads, kv heads, head dim, keys): the shapes of benchmarks/decode.py
    ("B8-H16-d64-n64k", 8, 16, 16, 64, 65536),
    ("GQA-B1-H32/8-d128-n128k", 1, 32, 8, 128, 131072),
]


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    import had_hf.kernels.triton_decode as decode

    for name in ("_distance_kernel", "_fine_count_kernel", "_attend_kernel"):
        setattr(decode, name, _NoLaunch())
    results = []
    for name, batch, heads, kv_heads, dim, keys in SHAPES:
        query = torch.randn(batch, heads, 1, dim, dtype=torch.bfloat16)
        key_words = torch.zeros(batch, kv_heads, keys, dim // 32, dtype=torch.int32)
        value = torch.zeros(batch, kv_heads, keys, dim, dtype=torch.bfloat16)
        top_n = -(-117 * keys // 1000)
        for _ in range(100):
            decode.hamming_topk_decode(query, key_words, value, None, top_n, 0.1)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(args.calls // 5):
                decode.hamming_topk_decode(query, key_words, value, None, top_n, 0.1)
            samples.append((time.perf_counter() - start) / (args.calls // 5) * 1e6)
        results.append({"shape": name, "us_per_call_median": sorted(samples)[2], "samples_us": samples})
        print(f"{name}: {sorted(samples)[2]:.1f} us per call (launches stubbed)", flush=True)
    summary = {
        "what": "had_hf's Python per hamming_topk_decode call, Triton launches replaced by no-ops, CPU tensors",
        "results": results,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "host": platform.node(),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join(["python", *sys.argv]),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
