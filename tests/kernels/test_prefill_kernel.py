"""The Triton prefill kernel (`had_hf.kernels.triton_prefill`): exact kept sets against the float64 per-row loop
(`kernel_helpers.loop_reference`).

CPU: the kernels through Triton's interpreter in a subprocess (`interpret_prefill_cases.py`), argument checks, and a
smoke run of `benchmarks/prefill.py`. GPU (`gpu` marker): the same small cases, and every benchmarked shape against
the package's PyTorch path (`reference_hamming_topk_attention`), kept sets compared exactly, heavy ties included.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import loop_reference
from prefill_helpers import TOLERANCE, PrefillCase, make_prefill_inputs

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parents[1]


def _interpreter_env() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


@requires_triton
def test_prefill_kernels_under_interpreter():
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(TESTS_DIR / "interpret_prefill_cases.py"),
    ]
    result = subprocess.run(command, env=_interpreter_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


@requires_triton
def test_prefill_benchmark_smoke(tmp_path):
    """`benchmarks/prefill.py --smoke`: tiny shapes on the CPU through the interpreter, every row checked."""
    out = tmp_path / "prefill.json"
    command = [sys.executable, "benchmarks/prefill.py", "--smoke", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=_interpreter_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["command"] and report["machine"] and report["rows"]
    for row in report["rows"]:
        for name in ("batch", "num_heads", "num_kv_heads", "head_dim", "n", "causal", "speedup"):
            assert name in row, (name, row)
        assert row["kept_sets_equal"] is True, row
        assert row["times_ms"]["threshold_pass"] > 0 and row["times_ms"]["attend_pass"] > 0
        assert set(row["peak_memory_bytes"]) >= {"sdpa_best", "had_kernel", "pytorch"}


@requires_triton
def test_supports_prefill_and_argument_checks():
    from had_hf.kernels import pack_sign_bits
    from had_hf.kernels.triton_prefill import PrefillConfig, hamming_topk_prefill, supports_prefill

    query, key, value = torch.randn(1, 4, 8, 64), torch.randn(1, 2, 9, 64), torch.randn(1, 2, 9, 32)
    assert supports_prefill(query, key, value)
    assert supports_prefill(query, pack_sign_bits(key), value)
    assert supports_prefill(query, pack_sign_bits(key).view(torch.int64), value.half())
    assert not supports_prefill(query[..., :48], key[..., :48], value)  # d = 48
    assert not supports_prefill(torch.randn(1, 4, 8, 256), torch.randn(1, 2, 9, 256), value)  # d = 256
    assert not supports_prefill(query, torch.randn(1, 3, 9, 64), torch.randn(1, 3, 9, 32))  # 4 heads on 3
    assert not supports_prefill(query, key, torch.randn(1, 2, 9, 24))  # dv = 24
    assert not supports_prefill(query, key, value.double())
    assert not supports_prefill(query, key, torch.randn(1, 2, 10, 32))  # n disagrees
    with pytest.raises(ValueError, match="prefill kernel needs"):
        hamming_topk_prefill(query[..., :48], key[..., :48], value, None, False, 3, 0.5)
    with pytest.raises(TypeError, match="valid_mask must be bool"):
        hamming_topk_prefill(query, key, value, torch.ones(1, 1, 8, 9), False, 3, 0.5)
    with pytest.raises(ValueError, match="alpha must be positive"):
        hamming_topk_prefill(query, key, value, None, False, 3, 0.0)
    for chunk in (0, 4096):
        with pytest.raises(ValueError, match="count_chunk must be 1 to 2048 tiles"):
            hamming_topk_prefill(query, key, value, None, False, 3, 0.5, config=PrefillConfig(count_chunk=chunk))


# ---------------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------------

GPU_CASES = [
    PrefillCase(dtype=torch.bfloat16),
    PrefillCase(
        num_heads=4,
        num_kv_heads=2,
        query_len=300,
        num_keys=300,
        head_dim=64,
        causal=True,
        patterns=3,
        top_n=36,
        dtype=torch.bfloat16,
    ),  # fmt: skip
    PrefillCase(
        query_len=100,
        num_keys=700,
        head_dim=128,
        value_dim=64,
        causal=True,
        mask="padding",
        patterns=2,
        top_n=82,
        dtype=torch.float16,
    ),  # fmt: skip
    PrefillCase(batch=2, num_heads=3, num_kv_heads=1, query_len=130, num_keys=200, mask="rows", top_n=30),
    PrefillCase(batch=1, query_len=17, num_keys=33, top_n=100, value_dim=64, patterns=1, dtype=torch.bfloat16),
    PrefillCase(
        batch=1, num_heads=1, num_kv_heads=1, query_len=200, num_keys=1500, head_dim=64, top_n=176, alpha=1.7
    ),  # fmt: skip
    PrefillCase(
        batch=2,
        num_heads=2,
        num_kv_heads=1,
        query_len=256,
        num_keys=1024,
        head_dim=128,
        value_dim=128,
        causal=True,
        mask="padding",
        patterns=2,
        top_n=120,
        dtype=torch.bfloat16,
    ),  # fmt: skip
]

# launch variants the benchmark sweeps: each must select exactly the same keys
GPU_CONFIGS = [
    {},
    {"score_mode": "dot8", "attend_mode": "dot8"},
    {"attend_mode": "dot16"},  # the default attend mode is dot8
    {"score_mode": "popcount"},
    {"block_m": 64, "block_n": 128, "attend_block_n": 32, "sample_tiles": 2},
    {"threshold_warps": 8, "attend_warps": 4, "threshold_stages": 2, "attend_stages": 2, "sample_tiles": 16},
    {"count_chunk": 2},  # the threshold kernel's fp16 counters summed every 2 tiles (1024 by default)
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("changes", GPU_CONFIGS, ids=lambda changes: "-".join(map(str, changes.values())) or "default")
def test_gpu_prefill_small_cases(case: PrefillCase, changes: dict):
    from had_hf.kernels.triton_prefill import default_prefill_config, hamming_topk_prefill

    query, key, value, mask, full, num_kept = make_prefill_inputs(case, seed=11)
    expected, expected_keep = loop_reference(query, key, value, full, num_kept, case.alpha)
    config = dataclasses.replace(default_prefill_config(case.head_dim, case.value_dim, case.num_keys), **changes)
    cuda = torch.device("cuda")
    out, keep = hamming_topk_prefill(
        query.to(cuda), key.to(cuda), value.to(cuda), None if mask is None else mask.to(cuda), case.causal,
        num_kept.to(cuda), case.alpha, return_keep=True, config=config,
    )  # fmt: skip
    assert torch.equal(keep.cpu(), expected_keep)
    assert not out.isnan().any()
    tol = TOLERANCE[case.dtype]
    assert torch.allclose(out.double().cpu(), expected, atol=tol, rtol=tol)


# the shapes of benchmarks/prefill.py: (batch, query heads, kv heads, head dim, n, causal)
BENCHMARK_SHAPES = [
    (1, 12, 12, 64, 4096, False),
    (1, 12, 12, 64, 16384, False),
    (1, 12, 12, 64, 32768, False),
    (1, 12, 12, 64, 131072, False),
    (1, 32, 8, 128, 16384, True),
    (1, 32, 8, 128, 65536, True),
    (64, 12, 12, 64, 512, False),
]


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).norm() / reference.norm().clamp_min(1e-30))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize(
    "shape", BENCHMARK_SHAPES, ids=lambda s: f"B{s[0]}-H{s[1]}/{s[2]}-d{s[3]}-n{s[4]}-c{int(s[5])}"
)
@pytest.mark.parametrize("ties", [False, True], ids=["normal", "heavy_ties"])
def test_gpu_prefill_benchmark_shapes(shape, ties):
    """The last rows (all of them up to 4k positions; 256 beyond) of each benchmarked shape against the PyTorch path:
    the same kept sets, the output to a bf16 relative error. Heavy ties: keys and queries of 3 sign patterns (nearly
    every score tied), with left padding on half the batch."""
    from had_hf.kernels import reference_hamming_topk_attention
    from had_hf.kernels.triton_prefill import hamming_topk_prefill

    batch, num_heads, num_kv_heads, dim, n, causal = shape
    rows = n if n <= 4096 else 256
    top_n = math.ceil(0.117 * n)
    generator = torch.Generator(device="cuda").manual_seed(n + num_heads + ties)
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    query = torch.randn(batch, num_heads, rows, dim, generator=generator, **cuda)
    key = torch.randn(batch, num_kv_heads, n, dim, generator=generator, **cuda)
    value = torch.randn(batch, num_kv_heads, n, dim, generator=generator, **cuda)
    mask = None
    if ties:
        pool = torch.randn(3, dim, generator=generator, **cuda)
        pick = torch.randint(0, 3, (batch, num_kv_heads, n), generator=generator, device="cuda")
        key = pool[pick] * (torch.rand(key.shape, generator=generator, **cuda) + 0.1)
        query = pool[torch.randint(0, 3, (batch, num_heads, rows), generator=generator, device="cuda")]
        mask = torch.ones(batch, 1, 1, n, dtype=torch.bool, device="cuda")
        mask[batch // 2 :, ..., : n // 3] = False
    valid = torch.ones(batch, 1, rows, n, dtype=torch.bool, device="cuda")
    if mask is not None:
        valid &= mask
    if causal:
        valid &= torch.arange(n, device="cuda")[None, :] <= torch.arange(rows, device="cuda")[:, None] + (n - rows)
    num_kept = valid.sum(-1).clamp(max=top_n).to(torch.int32)  # (B, 1, rows): broadcast over the heads
    alpha = 1.0 / math.sqrt(dim)
    out, keep = hamming_topk_prefill(query, key, value, mask, causal, num_kept, alpha, return_keep=True)
    ref, ref_keep = reference_hamming_topk_attention(query, key, value.double(), valid, top_n, alpha, return_keep=True)
    assert torch.equal(keep, ref_keep)
    assert not out.isnan().any() and _relative_error(out, ref) < 1e-2
