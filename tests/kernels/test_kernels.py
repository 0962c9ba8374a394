"""Sign packing, the PyTorch reference of HAD decode attention, and the Triton kernels (interpreter and GPU).

Kept sets are compared exactly (METHOD.md: every implementation selects the same keys); outputs against a float64
per-row loop (`kernel_helpers.loop_reference`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_helpers import SELECTION_CASES, Case, check_triton_decode, loop_reference, make_inputs

from had_hf.kernels import (
    hamming_scores_packed,
    pack_sign_bits,
    popcount32,
    reference_hamming_topk_attention,
    unpack_sign_bits,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
TESTS_DIR = Path(__file__).resolve().parent


def hamming_topk_attention(query, key, value, mask, top_n, alpha):
    """The `had::hamming_topk_attention` op (what inference runs) with a fixed N, no bias, no causal flag."""
    return torch.ops.had.hamming_topk_attention(query, key, value, mask, None, False, top_n, None, alpha)


# ---------------------------------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [32, 64, 128, 256, 96])
def test_pack_round_trip_and_sign_of_zero(dim):
    x = torch.randn(3, 5, dim)
    x[0, 0, :7] = 0.0
    x[0, 1, :7] = -0.0  # IEEE -0.0 >= 0 too: sign(-0.0) = +1
    words = pack_sign_bits(x)
    assert words.shape == (3, 5, dim // 32) and words.dtype == torch.int32
    assert torch.equal(unpack_sign_bits(words, dim), torch.where(x >= 0, 1.0, -1.0))
    assert torch.equal(unpack_sign_bits(words, dim)[0, :2, :7], torch.ones(2, 7))


def test_pack_bit_layout():
    x = -torch.ones(2, 64)
    x[0, 33] = 1.0  # dimension 33 = bit 1 of word 1
    x[1, 31] = 2.0  # bit 31 of word 0: the int32 sign bit
    words = pack_sign_bits(x)
    assert words.tolist() == [[0, 2], [-(2**31), 0]]
    # int64 words of 64 dimensions are the same bits, little-endian
    assert torch.equal(unpack_sign_bits(words.view(torch.int64)), unpack_sign_bits(words))


def test_pack_rejects_bad_dims():
    with pytest.raises(ValueError):
        pack_sign_bits(torch.randn(2, 48))
    with pytest.raises(ValueError):
        unpack_sign_bits(torch.zeros(2, 2, dtype=torch.int32), 32)


def test_popcount_matches_python():
    words = torch.randint(-(2**31), 2**31 - 1, (1000,), dtype=torch.int32)
    words[:3] = torch.tensor([0, -1, -(2**31)], dtype=torch.int32)
    expected = [bin(w & 0xFFFFFFFF).count("1") for w in words.tolist()]
    assert popcount32(words).tolist() == expected


@pytest.mark.parametrize("dim", [32, 64, 128])
def test_hamming_scores_are_binary_dot_products(dim):
    query, key = torch.randn(2, 3, 7, dim), torch.randn(2, 3, 50, dim)
    scores = hamming_scores_packed(pack_sign_bits(query), pack_sign_bits(key))
    expected = torch.where(query >= 0, 1.0, -1.0) @ torch.where(key >= 0, 1.0, -1.0).transpose(-1, -2)
    assert scores.dtype == torch.int32 and torch.equal(scores.double(), expected.double())
    assert int(scores.abs().max()) <= dim and bool(((scores - dim) % 2 == 0).all())


# ---------------------------------------------------------------------------------------------------------------------
# the PyTorch reference against the float64 loop
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", SELECTION_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("packed", [False, True], ids=["float_keys", "packed_keys"])
def test_reference_matches_loop(case: Case, packed: bool):
    query, key, value, valid = make_inputs(case, seed=hash(case.id) % 1000, value_dtype=torch.float64)
    expected, expected_keep = loop_reference(query, key, value, valid, case.top_n, case.alpha)
    key_arg = pack_sign_bits(key) if packed else key
    out, keep = reference_hamming_topk_attention(
        query, key_arg, value, valid, case.top_n, case.alpha, return_keep=True
    )
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    # the cases are built to exercise the rules: some row keeps exactly N with ties cut at the threshold
    valid_counts = (torch.ones_like(keep) if valid is None else valid.expand_as(keep)).sum(-1)
    assert torch.equal(keep.sum(-1), valid_counts.clamp(max=case.top_n))


def test_reference_heavy_ties_cut_by_index():
    # every key has the same score: the first N valid keys in index order are the kept set
    query = torch.ones(1, 1, 1, 32)
    key = torch.ones(1, 1, 50, 32)
    valid = torch.ones(1, 1, 1, 50, dtype=torch.bool)
    valid[..., :5] = False
    _, keep = reference_hamming_topk_attention(query, key, torch.randn(1, 1, 50, 8), valid, 10, 1.0, return_keep=True)
    assert keep[0, 0, 0].nonzero().flatten().tolist() == list(range(5, 15))


def test_reference_fully_masked_rows_are_zero():
    case = Case(mask="empty_rows", query_len=2, num_keys=30, top_n=5)
    query, key, value, valid = make_inputs(case)
    valid = torch.zeros_like(valid)
    out = reference_hamming_topk_attention(query, key, value, valid, 5, 0.5)
    assert not out.isnan().any() and bool((out == 0).all())


def test_reference_chunks_long_queries(monkeypatch):
    import had_hf.kernels.reference as reference

    case = Case(query_len=9, mask="causal", num_keys=60, top_n=7)
    query, key, value, valid = make_inputs(case)
    whole, whole_keep = reference_hamming_topk_attention(query, key, value, valid, 7, 0.5, return_keep=True)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1)  # one query row per chunk
    out, keep = reference_hamming_topk_attention(query, key, value, valid, 7, 0.5, return_keep=True)
    assert torch.equal(keep, whole_keep)
    assert torch.allclose(out, whole, atol=1e-6, rtol=1e-6)


def test_op_on_cpu_runs_the_reference():
    case = Case(mask="padding", num_keys=64, top_n=9)
    query, key, value, valid = make_inputs(case)
    expected = reference_hamming_topk_attention(query, key, value, valid, case.top_n, case.alpha)
    assert torch.equal(hamming_topk_attention(query, key, value, valid, case.top_n, case.alpha), expected)
    packed = pack_sign_bits(key)
    assert torch.equal(hamming_topk_attention(query, packed, value, valid, case.top_n, case.alpha), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels through the interpreter (CPU): a subprocess, since TRITON_INTERPRET must be set before triton loads
# ---------------------------------------------------------------------------------------------------------------------


@requires_triton
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    source = str(TESTS_DIR.parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(TESTS_DIR / "interpret_triton_cases.py"),
    ]
    result = subprocess.run(command, env=env, cwd=TESTS_DIR.parents[1], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


@requires_triton
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """Every kernel that the decode calls (short kernel, split-K) and the prefill calls launch compiles to a cubin for
    sm_90 at the launch settings of real calls, attention sinks with and without a mask included (the decode kernels'
    sink scan is a data-dependent loop that the interpreter runs as Python), within the H100's 227 KB of shared
    memory per block, the decode kernels without register spills (ptxas -v; the prefill kernels' spills are in
    benchmarks/README.md): `hopper_compile_probe.py`, through Triton's CUDA backend, which needs no GPU."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(TESTS_DIR.parents[1] / "src"))  # fmt: skip
    probe = str(TESTS_DIR / "hopper_compile_probe.py")
    result = subprocess.run([sys.executable, probe], env=env, capture_output=True, text=True, timeout=900)
    missing = r"No module named 'triton\.backends\.nvidia'|(cannot|could not) find.{0,20}ptxas|ptxas.{0,40}not found"
    if re.search(missing, result.stderr, flags=re.IGNORECASE):
        pytest.skip(f"this triton cannot compile for CUDA here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    kernels: dict[str, list[str]] = {}
    for record in records:
        assert record["cubin"] and 0 < record["shared"] <= 227 * 1024, record
        assert record["registers"] and record["spill_bytes"] is not None, record  # ptxas -v read
        if not record["call"].startswith("prefill"):
            assert record["spill_bytes"] == 0, record  # the decode kernels spill no registers
        kernels.setdefault(record["call"], []).append(record["kernel"])
    expected = {"short": ["_short_decode_kernel"], "split-k": ["_distance_kernel", "_fine_count_kernel",
                                                                "_attend_kernel"],
                "prefill": ["_threshold_kernel", "_attend_kernel"]}  # fmt: skip
    assert len(kernels) == 24
    for call, names in kernels.items():
        assert names == expected[call.split()[0] if call.startswith("prefill") else call.split()[1]], call
    assert sum("sinks 1" in call and "mask padding" in call for call in kernels) == 4


@requires_triton
@pytest.mark.parametrize(
    "option, size, message",
    [
        ("hist_block_elements", 48, "hist_block_elements must be a power of two, got 48"),
        ("block_n", 48, "block_n must be a power of two >= 16, got 48"),
        ("block_n", 8, "block_n must be a power of two >= 16, got 8"),
        ("gather_block", 24, "gather_block must be a power of two >= 16, got 24"),
        ("gather_stages", -1, "gather_stages must be an integer >= 0, got -1"),
        ("num_warps", (4, 4), "num_warps takes one value or three"),
        ("attend_split_group", 3, "attend_split_group must be a power of two"),
        ("short_row_block", 3, "short_row_block must be 1, 2 or 4"),
    ],
)
def test_decode_kernel_rejects_bad_block_sizes(option, size, message):
    from had_hf.kernels.triton_decode import hamming_topk_decode

    case = Case(batch=1, num_heads=1, num_kv_heads=1, num_keys=64, top_n=8)
    query, key, value, valid = make_inputs(case, seed=0)
    with pytest.raises(ValueError, match=message):
        hamming_topk_decode(query, pack_sign_bits(key), value, valid, case.top_n, case.alpha, **{option: size})


@requires_triton
@pytest.mark.parametrize(
    "options, head_dim, message",
    [
        (
            dict(short_kernel=True, num_splits=2),
            64,
            r"short_kernel=True takes none of the three-kernel path's options",
        ),
        (dict(short_kernel=False, short_row_block=1), 64, "short_kernel=False takes none of the short kernel's"),
        (dict(gather_stages=2, interleave_gather=True, short_num_warps=8), 64, "cannot be combined"),
        (dict(short_kernel=True), 256, "The short decode kernel takes head dims up to 128, got 256"),
        (dict(short_row_block=2), 256, "The short decode kernel takes head dims up to 128, got 256"),
    ],
)
def test_decode_kernel_rejects_options_of_the_other_path(options, head_dim, message):
    from had_hf.kernels.triton_decode import hamming_topk_decode

    case = Case(batch=1, num_heads=1, num_kv_heads=1, num_keys=64, top_n=8, head_dim=head_dim)
    query, key, value, valid = make_inputs(case, seed=0)
    with pytest.raises(ValueError, match=message):
        hamming_topk_decode(query, pack_sign_bits(key), value, valid, case.top_n, case.alpha, **options)


@requires_triton
def test_short_kernel_dispatch_rule(monkeypatch):
    """By default (SHORT_BY_DEFAULT) the short kernel serves n x dv <= 2^19 at d <= 128 unless split options are
    given; its own options ask for it, and without SHORT_BY_DEFAULT only they do."""
    from had_hf.kernels import decode_launch
    from had_hf.kernels.decode_launch import SHORT_MAX_KEY_VALUES, short_kernel_wanted

    assert decode_launch.SHORT_BY_DEFAULT and SHORT_MAX_KEY_VALUES == 8192 * 64
    assert short_kernel_wanted({}, 8192, 64, 64) and not short_kernel_wanted({}, 8193, 64, 64)
    assert short_kernel_wanted({}, 4096, 128, 128) and not short_kernel_wanted({}, 4097, 128, 128)
    assert not short_kernel_wanted({}, 4096, 256, 64)  # d = 256: the three kernels
    # an option of one path asks for it (at its default it does not)
    assert not short_kernel_wanted(dict(num_splits=3), 4096, 64, 64)
    assert not short_kernel_wanted(dict(single_row_dot=True), 4096, 64, 64)
    assert short_kernel_wanted(dict(num_splits=None, split_block=32, attend_split_group=1), 4096, 64, 64)
    assert short_kernel_wanted(dict(short_row_block=1), 65536, 64, 64)
    assert short_kernel_wanted(dict(short_kernel=True), 65536, 64, 64)
    assert not short_kernel_wanted(dict(short_kernel=False), 100, 64, 64)
    monkeypatch.setattr(decode_launch, "SHORT_BY_DEFAULT", False)
    assert not short_kernel_wanted({}, 4096, 64, 64) and short_kernel_wanted(dict(short_row_block=1), 4096, 64, 64)


@requires_triton
@pytest.mark.parametrize(
    ("n_keys", "rows_per_group", "kv_groups", "sms", "row_block"),
    [(4096, 4, 8, 132, 1), (4096, 3, 3, 132, 1), (4096, 1, 128, 132, 1), (4096, 4, 100, 132, 2), (4096, 4, 256, 132, 4),
     (4096, 3, 512, 132, 4), (4096, 8, 512, 132, 4), (300, 6, 2, 1, 4), (100, 1, 4, 1, 1)],
)  # fmt: skip
def test_short_decode_launch_settings(n_keys, rows_per_group, kv_groups, sms, row_block):
    from had_hf.kernels.decode_launch import short_decode_launch

    launch = short_decode_launch(n_keys, rows_per_group, kv_groups, sms)
    # one row per program while programs stay within two per multiprocessor, then 2 and 4 rows (at most the group's)
    assert launch.r_block == row_block
    assert launch.num_row_blocks == math.ceil(rows_per_group / row_block)
    keys = max(16, 1 << (n_keys - 1).bit_length())
    assert launch.count_block_n == min(keys, 1024 // row_block) and launch.select_block_n == min(keys, 1024)
    # each knob overrides its choice
    forced = short_decode_launch(n_keys, rows_per_group, kv_groups, sms, row_block=2, block_n=128,
                                 hist_block_elements=256)  # fmt: skip
    assert forced.r_block == min(2, 1 << (rows_per_group - 1).bit_length())
    assert forced.select_block_n == min(keys, 128) and forced.count_block_n == min(keys, 256 // forced.r_block)


@requires_triton
def test_empty_batch_gives_empty_outputs():
    from had_hf.kernels.triton_decode import hamming_topk_decode

    case = Case(batch=1, num_heads=4, num_kv_heads=2, query_len=2, num_keys=64, top_n=8)
    query, key, value, _ = make_inputs(case, seed=0)
    query, key, value = query[:0], key[:0], value[:0]
    for attend in (hamming_topk_decode, reference_hamming_topk_attention):
        out, keep = attend(query, pack_sign_bits(key), value, None, case.top_n, case.alpha, return_keep=True)
        assert out.shape == (0, 4, 2, value.shape[-1]) and keep.shape == (0, 4, 2, 64)


# ---------------------------------------------------------------------------------------------------------------------
# GPU: exact selection at the small cases and at every benchmarked shape, bf16 outputs against float64
# ---------------------------------------------------------------------------------------------------------------------

# the shapes of benchmarks/decode.py: (batch, query heads, kv heads, head dim, keys)
BENCHMARK_SHAPES = [
    (8, 16, 16, 64, 16384),
    (8, 16, 16, 64, 65536),
    (8, 16, 16, 64, 131072),
    (1, 32, 8, 128, 131072),
]


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).norm() / reference.norm().clamp_min(1e-30))


# the paths of a decode call: the three kernels (splits by the heuristic, or 3) and the short kernel (1 or 4 rows per
# program, the hand-written prefetch of the gather)
DECODE_PATHS = [
    dict(short_kernel=False),
    dict(num_splits=3),
    dict(short_kernel=True),
    dict(short_row_block=4, gather_stages=0),
]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_attention_sinks_run_the_kernels():
    """sink_keys > 0 with alpha > 0 runs the kernels (decode and prefill), which keep each row's first key as the
    reference does; with alpha <= 0 (and for prefill calls whatever the sinks) the op's CUDA implementation runs the
    reference."""
    from had_hf.kernels import triton_kernel_for

    cuda = torch.device("cuda")
    generator = torch.Generator().manual_seed(3)
    for query_len in (1, 40):
        query = torch.randn(2, 4, query_len, 64, generator=generator).to(cuda, torch.bfloat16)
        key = torch.randn(2, 2, 300, 64, generator=generator).to(cuda, torch.bfloat16)
        value = torch.randn(2, 2, 300, 64, generator=generator).to(cuda, torch.bfloat16)
        assert triton_kernel_for(query, key, value, None, None, sink_keys=1, alpha=0.3) is not None
        assert triton_kernel_for(query, key, value, None, None, sink_keys=1, alpha=-0.3) is None
        # a prefill call needs alpha > 0 (the decode kernels take either sign without sinks)
        assert (triton_kernel_for(query, key, value, None, None, alpha=-0.3) is None) == (query_len > 16)
        out = torch.ops.had.hamming_topk_attention(query, key, value, None, None, False, 8, None, 0.3, 1)
        expected, keep = reference_hamming_topk_attention(query.cpu(), key.cpu(), value.cpu().double(), None, 8, 0.3,
                                                          return_keep=True, sink_keys=1)  # fmt: skip
        assert keep[..., 0].all()
        assert torch.allclose(out.double().cpu(), expected, atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("case", SELECTION_CASES[:8], ids=lambda case: case.id)
@pytest.mark.parametrize("path", DECODE_PATHS, ids=str)
def test_gpu_decode_kernels_keep_the_attention_sinks(case: Case, path: dict):
    check_triton_decode(case, seed=3, device="cuda", sink_keys=2, **path)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("case", SELECTION_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("path", DECODE_PATHS, ids=str)
def test_gpu_kernel_small_cases(case: Case, path: dict):
    from had_hf.kernels.triton_decode import hamming_topk_decode

    if case.head_dim > 128 and (path.get("short_kernel") or "short_row_block" in path):
        pytest.skip("the short kernel takes head dims up to 128")
    query, key, value, valid = make_inputs(case, seed=7, value_dtype=torch.float64)
    expected, expected_keep = loop_reference(query, key, value, valid, case.top_n, case.alpha)
    cuda = torch.device("cuda")
    query_c, value_c = query.to(cuda, torch.bfloat16), value.to(cuda, torch.bfloat16)
    key_words = pack_sign_bits(key).to(cuda)
    valid_c = None if valid is None else valid.to(cuda)
    out, keep = hamming_topk_decode(
        query_c,
        key_words,
        value_c,
        valid_c,
        case.top_n,
        case.alpha,
        block_n=32,
        return_keep=True,
        **path,
    )
    assert torch.equal(keep.cpu(), expected_keep)
    assert not out.isnan().any()
    # values rounded to bf16 on the way in, weights to bf16 in the kernel: a few bf16 ulps
    assert torch.allclose(out.double().cpu(), expected, atol=3e-2, rtol=2e-2)
    # float32 values: the same kernel in full precision
    out32 = hamming_topk_decode(query_c, key_words, value.float().to(cuda), valid_c, case.top_n, case.alpha, **path)
    assert torch.allclose(out32.double().cpu(), expected, atol=1e-5, rtol=1e-5)
    # float64 values are accumulated in float32 too (programs of several rows once failed to compile for them)
    out64 = hamming_topk_decode(query_c, key_words, value.to(cuda), valid_c, case.top_n, case.alpha, **path)
    assert out64.dtype == torch.float64 and torch.allclose(out64.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON) or torch.cuda.device_count() < 2, reason="needs 2 GPUs and triton")
def test_gpu_kernel_on_a_device_that_is_not_the_current_one():
    # a model split over GPUs: Triton launches on the current device, so the kernels must make the tensors' current
    from had_hf.kernels.triton_decode import hamming_topk_decode, triton_pack_sign_bits

    case = Case(num_heads=8, num_kv_heads=2, query_len=2, mask="causal", num_keys=700, top_n=150, patterns=2)
    query, key, value, valid = make_inputs(case, seed=5)
    expected, expected_keep = loop_reference(query, key, value, valid, case.top_n, case.alpha)
    other = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    key_words = triton_pack_sign_bits(key.to(other))
    assert key_words.device == other and torch.equal(key_words.cpu(), pack_sign_bits(key))
    out, keep = hamming_topk_decode(
        query.to(other), key_words, value.float().to(other), valid.to(other), case.top_n, case.alpha, return_keep=True
    )
    torch.cuda.synchronize(other)
    assert out.device == other and torch.equal(keep.cpu(), expected_keep)
    assert torch.allclose(out.double().cpu(), expected, atol=1e-5, rtol=1e-5)


# more splits than a tile of the last programs' reductions, heavy ties whose quota crosses tiles (the interpreter
# runs the same cases: interpret_triton_cases.SPLIT_TILE_CASES)
SPLIT_TILE_CASES = [
    Case(num_keys=700, top_n=300, mask="padding", patterns=1),
    Case(num_heads=8, num_kv_heads=2, query_len=2, mask="causal", num_keys=700, top_n=150, patterns=2),
]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("case", SPLIT_TILE_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("split_block", [1, 2, 4, 32])
@pytest.mark.parametrize("num_stages", [None, 1, (1, 3, 2)], ids=str)
def test_gpu_kernel_split_tiles(case: Case, split_block, num_stages):
    check_triton_decode(case, seed=13, device="cuda", num_splits=11, split_block=split_block, num_stages=num_stages)


# the launch variants that benchmarks/decode_variants.py times (the interpreter checks them too, but not their sm_90
# code: the pipeliner's asynchronous copies, tensor cores on bf16 values, capped registers)
LAUNCH_VARIANTS = [
    dict(gather_stages=3),
    dict(gather_stages=3, gather_block=64, block_n=256),
    dict(interleave_gather=True, gather_stages=3, max_registers=(None, None, 128)),
    dict(attend_split_group=2, block_n=256),
    dict(max_registers=(64, None, 64)),
]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("case", SPLIT_TILE_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("options", LAUNCH_VARIANTS, ids=str)
def test_gpu_kernel_launch_variants(case: Case, options):
    import triton

    from had_hf.kernels.triton_decode import hamming_topk_decode

    if options.get("interleave_gather") and case.mask == "causal" and triton.__version__.startswith("3.6."):
        # Triton 3.6 (torch 2.11's) stops in its coalescing pass on the grouped-query causal case (an MLIR AxisInfo
        # assertion; the padding case compiles); Triton 3.9 compiles both (hopper_compile_probe's way, without a
        # GPU). Fails once 3.6 compiles it.
        with pytest.raises(RuntimeError, match="PassManager::run failed"):
            check_triton_decode(case, seed=13, device="cuda", num_splits=11, **options)
        return
    check_triton_decode(case, seed=13, device="cuda", num_splits=11, **options)
    query, key, value, valid = make_inputs(case, seed=13)
    args = (query.cuda(), pack_sign_bits(key).cuda(), value.cuda().bfloat16(), valid.cuda(), case.top_n, case.alpha)
    default = hamming_topk_decode(*args, num_splits=11)
    assert _relative_error(hamming_topk_decode(*args, num_splits=11, **options), default.double()) < 1e-2


def _gpu_decode_inputs(shape):
    """bf16 decode inputs on the GPU of a (batch, query heads, kv heads, head dim, keys) shape: one query position,
    left padding on half of the batch (random normal keys give ~d+1 score levels over n keys: heavy ties), N =
    ceil(0.117 n), and alpha."""
    batch, num_heads, num_kv_heads, dim, n = shape
    generator = torch.Generator(device="cuda").manual_seed(n + num_heads)
    query = torch.randn(batch, num_heads, 1, dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    key = torch.randn(batch, num_kv_heads, n, dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    value = torch.randn(batch, num_kv_heads, n, dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    valid = torch.ones(batch, 1, 1, n, dtype=torch.bool, device="cuda")
    valid[batch // 2 :, ..., : n // 3] = False
    return query, key, value, valid, math.ceil(0.117 * n), 0.4 / math.sqrt(dim)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("shape", BENCHMARK_SHAPES, ids=lambda s: f"B{s[0]}-H{s[1]}/{s[2]}-d{s[3]}-n{s[4]}")
def test_gpu_kernel_benchmark_shapes(shape):
    from had_hf.kernels.triton_decode import hamming_topk_decode, triton_pack_sign_bits

    query, key, value, valid, top_n, alpha = _gpu_decode_inputs(shape)
    key_words = triton_pack_sign_bits(key)
    assert torch.equal(key_words, pack_sign_bits(key))
    for mask in (None, valid):
        out, keep = hamming_topk_decode(query, key_words, value, mask, top_n, alpha, return_keep=True)
        ref64, ref_keep = reference_hamming_topk_attention(
            query, key_words, value.double(), mask, top_n, alpha, return_keep=True
        )
        assert torch.equal(keep, ref_keep)
        assert _relative_error(out, ref64) < 1e-2
        # the dispatcher (float keys: packs them first) takes the same path
        assert torch.equal(hamming_topk_attention(query, key, value, mask, top_n, alpha), out)
        del keep, ref_keep, ref64


# the generation shapes of issue 21 (batch, query heads, kv heads, head dim, keys): the random Llama's layer at 4k,
# SmolLM2's at 2k and 8k, and 16 heads of batch 8 at 4k (the short kernel by default); and past the dispatcher's bound
# (2^19 key values: the three kernels by default)
SHORT_SHAPES = [
    (1, 32, 8, 64, 4096),
    (1, 9, 3, 64, 2048),
    (1, 9, 3, 64, 8192),
    (8, 16, 16, 64, 4096),
    (2, 8, 2, 128, 8192),
]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("shape", SHORT_SHAPES, ids=lambda s: f"B{s[0]}-H{s[1]}/{s[2]}-d{s[3]}-n{s[4]}")
def test_gpu_short_kernel_generation_shapes(shape):
    """At the generation shapes the short kernel keeps the reference's keys (bf16, left padding), agrees with the
    three-kernel path, is what the dispatcher runs by default within its bound, and replays in a CUDA graph with the same
    bits as eagerly."""
    from had_hf.kernels.decode_launch import short_kernel_wanted
    from had_hf.kernels.triton_decode import hamming_topk_decode, triton_pack_sign_bits

    query, key, value, valid, top_n, alpha = _gpu_decode_inputs(shape)
    key_words = triton_pack_sign_bits(key)
    _, _, _, dim, n = shape
    short_by_default = short_kernel_wanted({}, n, dim, dim)
    for mask in (None, valid):
        ref64, ref_keep = reference_hamming_topk_attention(
            query, key_words, value.double(), mask, top_n, alpha, return_keep=True
        )
        for options in (dict(short_kernel=True), dict(short_row_block=4), dict(short_row_block=2, gather_stages=0)):
            out, keep = hamming_topk_decode(query, key_words, value, mask, top_n, alpha, return_keep=True, **options)
            assert torch.equal(keep, ref_keep), options
            assert _relative_error(out, ref64) < 1e-2, options
        short = hamming_topk_decode(query, key_words, value, mask, top_n, alpha, short_kernel=True)
        split = hamming_topk_decode(query, key_words, value, mask, top_n, alpha, short_kernel=False)
        default = hamming_topk_decode(query, key_words, value, mask, top_n, alpha)
        assert torch.equal(default, short if short_by_default else split)
        assert _relative_error(short, split.double()) < 1e-2
        # captured in a CUDA graph (its scratch allocated in the graph's pool), then replayed
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            hamming_topk_decode(query, key_words, value, mask, top_n, alpha, short_kernel=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = hamming_topk_decode(query, key_words, value, mask, top_n, alpha, short_kernel=True)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, short)
        del ref64, ref_keep, keep, graph


@pytest.mark.parametrize("case", SELECTION_CASES, ids=lambda case: case.id)
def test_op_with_the_ratio_rule_keeps_each_rows_n(case: Case):
    """N = ceil(ratio * the row's valid keys), against the float64 loop given those N."""
    query, key, value, valid = make_inputs(case, seed=7)
    counts = torch.full((1, 1, case.query_len), case.num_keys) if valid is None else valid.sum(-1)
    rows_n = torch.ceil(counts.double() * 0.3).clamp(min=1).to(torch.int32)  # the rule, written out independently
    expected, expected_keep = loop_reference(query, key, value, valid, rows_n, case.alpha)
    out, keep = reference_hamming_topk_attention(query, key, value, valid, None, case.alpha, True, top_n_ratio=0.3)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    op_out = torch.ops.had.hamming_topk_attention(query, key, value, valid, None, False, None, 0.3, case.alpha)
    assert torch.equal(op_out, out)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("case", SELECTION_CASES[:9], ids=lambda case: case.id)
def test_gpu_op_runs_the_kernel_and_keeps_the_references_outputs(case: Case):
    """On CUDA the op takes the Triton kernel (fixed N and the ratio rule, causal flag included); opcheck passes."""
    query, key, value, valid = (None if x is None else x.cuda() for x in make_inputs(case, seed=11))
    op = torch.ops.had.hamming_topk_attention
    for top_n, ratio in ((case.top_n, None), (None, 0.3)):
        expected = reference_hamming_topk_attention(query, key, value, valid, top_n, case.alpha, top_n_ratio=ratio)
        got = op(query, key, value, valid, None, False, top_n, ratio, case.alpha)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        causal = op(query, key, value, None, None, True, top_n, ratio, case.alpha)
        expected = reference_hamming_topk_attention(query, key, value, None, top_n, case.alpha, top_n_ratio=ratio,
                                                    is_causal=True)  # fmt: skip
        torch.testing.assert_close(causal, expected, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(op.default, (query, key, value, valid, None, False, None, 0.3, case.alpha))


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_kernels_kept_count_equals_the_rule():
    """The decode kernels' copy of the N rule, compiled for the GPU, gives `kept_counts`' N (on the GPU and on the CPU)
    for every count up to 2^20 and ratios whose float64 product lands just above an integer."""
    from kept_count_kernel import kernel_kept_counts

    from had_hf.selection import kept_counts

    counts = torch.cat([torch.arange(1 << 20), torch.tensor([2**30 + 3, 2**31 - 1])]).to(torch.int32)
    ratios = [0.1, 0.117, 0.3, 1 / 3, 0.7, 1.0, 2**-30, 1 - 2**-53]
    ratios += torch.rand(10, generator=torch.Generator().manual_seed(1), dtype=torch.float64).tolist()
    for ratio in ratios:
        expected = kept_counts(counts, None, ratio)
        assert torch.equal(kept_counts(counts.cuda(), None, ratio).cpu(), expected), ratio
        assert torch.equal(kernel_kept_counts(counts.cuda(), None, ratio).cpu(), expected), ratio
    for top_n in (1, 5000):
        assert torch.equal(kernel_kept_counts(counts.cuda(), top_n, None).cpu(), kept_counts(counts, top_n, None))


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("n_keys", [4096, 16384], ids=["short", "three-kernels"])
def test_gpu_decode_op_launches_only_its_kernels(n_keys: int):
    """A decode step of the op on CUDA at the generation shape (bf16, the whole static-cache buffers, a (B, 1, 1, n)
    mask, N = ceil(0.117 v)) launches its Triton kernels and nothing else (no PyTorch kernel: inside a compiled step
    the opaque op would run them eagerly), and keeps the reference's output."""
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator(device="cuda").manual_seed(2)
    batch, num_heads, num_kv_heads, dim = 1, 32, 8, 64
    query = torch.randn(batch, 1, num_heads, dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    query = query.transpose(1, 2)  # as the projection hands it over
    key_words = pack_sign_bits(torch.randn(batch, num_kv_heads, n_keys, dim, device="cuda", generator=generator))
    value = torch.randn(batch, num_kv_heads, n_keys, dim, device="cuda", generator=generator, dtype=torch.bfloat16)
    mask = (torch.arange(n_keys, device="cuda") < n_keys - 100)[None, None, None, :]
    args = (query, key_words, value, mask, None, False, None, 0.117, 0.02)
    op = torch.ops.had.hamming_topk_attention
    out = op(*args)  # compiles the kernels and allocates the scratch
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        op(*args)
        torch.cuda.synchronize()
    kernels = {event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA}
    expected = (
        {"_short_decode_kernel"} if n_keys <= 8192 else {"_distance_kernel", "_fine_count_kernel", "_attend_kernel"}
    )
    assert kernels == expected
    reference = reference_hamming_topk_attention(query, key_words, value.double(), mask, None, 0.02, top_n_ratio=0.117)
    assert _relative_error(out, reference) < 1e-2


@requires_triton
@pytest.mark.parametrize(
    ("rows_per_group", "sinks", "select_block_n"),
    [(1, False, 1024), (2, False, 1024), (3, False, 512), (4, False, 512), (4, True, 1024), (8, False, 1024),
     (16, False, 512), (16, True, 512)],
)  # fmt: skip
def test_decode_selection_tiles_by_rows_per_program(rows_per_group, sinks, select_block_n):
    """1024 keys for one or two rows; 512 for four (measured faster on the grouped-query shapes, with fewer
    registers) unless the call keeps sinks (whose attend kernel spills at 512, `hopper_compile_probe.py`); 8192
    (row, key) pairs beyond."""
    from had_hf.kernels.decode_launch import decode_launch

    assert decode_launch(131072, rows_per_group, 8, 132, sinks=sinks).select_block_n == select_block_n


@requires_triton
@pytest.mark.parametrize(
    ("n_keys", "rows_per_group", "kv_groups", "sms"),
    [(16384, 1, 128, 132), (131072, 4, 8, 132), (1000, 16, 2, 1), (100, 1, 1, 1), (65536, 32, 1, 132)],
)
def test_decode_launch_heuristic_covers_every_key_within_the_counter_limit(n_keys, rows_per_group, kv_groups, sms):
    from had_hf.kernels.decode_launch import decode_launch
    from had_hf.kernels.decode_split_k import MAX_ITERATIONS

    launch = decode_launch(n_keys, rows_per_group, kv_groups, sms)
    assert launch.r_block == min(16, 1 << (rows_per_group - 1).bit_length())
    assert launch.num_row_blocks * launch.r_block >= rows_per_group
    for splits, length, block in (
        (launch.num_splits, launch.split_len, launch.count_block_n),
        (launch.distance_splits, launch.distance_split_len, launch.distance_block_n),
    ):
        assert length % 64 == 0 and (splits - 1) * length < n_keys <= splits * length  # every key, no empty split
        assert math.ceil(length / block) + 64 // block <= MAX_ITERATIONS  # the packed 7-bit counters do not overflow
    assert launch.distance_splits <= launch.num_splits
    # programs per multiprocessor: 8 for one-row programs, 4 for several, unless the counters need more splits
    groups = kv_groups * launch.num_row_blocks
    first_block = max(16, min(1024, 1024 // launch.r_block))
    fewest = math.ceil(n_keys / ((MAX_ITERATIONS - 2 - 64 // first_block) * first_block))
    target = max((8 if launch.r_block == 1 else 4) * sms // groups, 1, fewest)
    assert launch.split_len == 64 * math.ceil(math.ceil(n_keys / target) / 64)
    # each knob overrides its choice
    assert decode_launch(n_keys, rows_per_group, kv_groups, sms, block_n=256).select_block_n == 256
    forced = decode_launch(n_keys, rows_per_group, kv_groups, sms, num_splits=max(3, fewest))
    assert forced.split_len == 64 * math.ceil(math.ceil(n_keys / max(3, fewest)) / 64)
    assert forced.distance_splits == forced.num_splits  # a given split count is every kernel's
