"""The Triton prefill kernels on the CPU through Triton's interpreter, at small shapes.

Run by `test_prefill_kernel.py::test_prefill_kernels_under_interpreter` in a subprocess with `TRITON_INTERPRET=1`
(the variable must be set before triton is imported). Directly:

    TRITON_INTERPRET=1 PYTHONPATH=src python -m pytest -q tests/kernels/interpret_prefill_cases.py
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

from kernel_helpers import loop_reference  # noqa: E402
from prefill_helpers import TOLERANCE, PrefillCase, make_prefill_inputs  # noqa: E402

from had_hf.kernels import pack_sign_bits  # noqa: E402
from had_hf.kernels.triton_prefill import (  # noqa: E402
    default_prefill_config,
    hamming_topk_prefill,
    prefill_attend_pass,
    prefill_threshold_pass,
    prepare_prefill,
)

# The interpreter's default launch: 16 x 16 tiles and samples of 2 tiles, so that these small problems span several
# tiles, take the sampled path (more than 2 tiles of keys) and the whole-range path (causal blocks near the start).
CASES = [
    PrefillCase(),
    PrefillCase(
        num_heads=4,
        num_kv_heads=2,
        query_len=48,
        num_keys=48,
        head_dim=64,
        causal=True,
        patterns=3,
        top_n=9,
        dtype=torch.bfloat16,
    ),  # fmt: skip
    PrefillCase(
        query_len=20,
        num_keys=70,
        head_dim=128,
        value_dim=16,
        causal=True,
        mask="padding",
        patterns=2,
        top_n=12,
        dtype=torch.float16,
    ),  # fmt: skip
    PrefillCase(batch=2, num_heads=3, num_kv_heads=1, query_len=24, num_keys=50, mask="rows", top_n=30),
    PrefillCase(batch=1, query_len=17, num_keys=33, top_n=100, value_dim=64, patterns=1),  # N > n, one pattern
    PrefillCase(
        batch=1, num_heads=1, num_kv_heads=1, query_len=40, num_keys=200, head_dim=64, patterns=0, top_n=24, alpha=1.7
    ),  # fmt: skip
]


def check(case: PrefillCase, seed: int = 0, key_transform=None, num_kept_override=None, sink_keys=0,
          **config_changes):  # fmt: skip
    query, key, value, mask, full, num_kept = make_prefill_inputs(case, seed)
    if num_kept_override is not None:
        num_kept = num_kept_override(num_kept)
    expected, expected_keep = loop_reference(query, key, value, full, num_kept, case.alpha, sink_keys)
    config = default_prefill_config(case.head_dim, case.value_dim, case.num_keys, interpreting=True)
    config = dataclasses.replace(config, **config_changes)
    key_arg = key if key_transform is None else key_transform(key)
    out, keep = hamming_topk_prefill(
        query, key_arg, value, mask, case.causal, num_kept, case.alpha, return_keep=True, config=config,
        sink_keys=sink_keys,
    )  # fmt: skip
    assert keep.shape == expected_keep.shape
    assert torch.equal(keep, expected_keep), (case.id, (keep != expected_keep).nonzero()[:5].tolist())
    assert out.dtype == value.dtype and not out.isnan().any()
    tol = TOLERANCE[case.dtype]
    assert torch.allclose(out.double(), expected, atol=tol, rtol=tol), (case.id, (out.double() - expected).abs().max())
    return out, keep, num_kept


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_prefill_matches_loop_reference(case):
    _, keep, num_kept = check(case, seed=1)
    assert torch.equal(keep.sum(-1).to(torch.int32), num_kept)  # exactly N (or all valid keys) per row


def test_prefill_heavy_ties_and_per_row_num_kept():
    """Two sign patterns: every score is one of two values, so the quota cuts long runs of ties; num_kept varies per
    row (0 included: zeros, never NaN) and is given broadcast over the batch."""
    case = PrefillCase(batch=2, num_heads=2, num_kv_heads=1, query_len=30, num_keys=90, head_dim=64, patterns=2,
                       causal=True, mask="padding")  # fmt: skip

    def per_row(valid_counts):
        wanted = (torch.arange(case.query_len) * 7) % 40  # 0 .. 39, some rows 0
        return torch.minimum(valid_counts, wanted.to(torch.int32))

    out, keep, num_kept = check(case, seed=2, num_kept_override=per_row)
    zero_rows = num_kept == 0
    assert bool(zero_rows.any()) and bool((out[zero_rows] == 0).all())


def test_prefill_packed_keys_and_other_score_modes():
    case = PrefillCase(batch=1, num_heads=2, num_kv_heads=1, query_len=20, num_keys=40, head_dim=64, causal=True,
                       patterns=4, top_n=11)  # fmt: skip
    check(case, seed=3, key_transform=pack_sign_bits)  # packed int32 words
    check(case, seed=3, key_transform=lambda k: pack_sign_bits(k).view(torch.int64))  # int64 words
    check(case, seed=3, score_mode="dot8", attend_mode="dot8")
    # XOR/popcount scores (int32 words at d = 32, two int64 words at d = 128; the interpreter's popcount is slow)
    small = dataclasses.replace(case, num_heads=1, query_len=12, num_keys=36)
    check(dataclasses.replace(small, head_dim=32, causal=False, mask="rows"), seed=4, score_mode="popcount")
    check(dataclasses.replace(small, head_dim=128), seed=5, score_mode="popcount", attend_mode="dot8")


def test_prefill_launch_shapes():
    """Bigger tiles than the problem, a sample of more tiles than the range (whole-range counting), rectangular
    tiles: the same selection."""
    case = PrefillCase(batch=1, num_heads=2, num_kv_heads=1, query_len=50, num_keys=120, causal=True, patterns=3,
                       top_n=15)  # fmt: skip
    check(case, seed=6, block_m=64, block_n=32, attend_block_m=32, attend_block_n=64, sample_tiles=16)
    check(case, seed=6, block_m=16, block_n=32, sample_tiles=1)


def test_prefill_misleading_sample_needs_more_rounds():
    """Keys whose sampled tiles score far from the rest: the first window misses and more rounds follow."""
    case = PrefillCase(batch=1, num_heads=1, num_kv_heads=1, query_len=16, num_keys=256, head_dim=32, top_n=40)
    query, key, value, mask, full, num_kept = make_prefill_inputs(case, seed=7)
    config = default_prefill_config(32, 32, 256, interpreting=True)  # 16 tiles, samples at tiles 4 and 12
    unit = torch.where(query[0, 0, 0] >= 0, 1.0, -1.0)
    key[0, 0] = -unit * (torch.rand(256, 32) + 0.1)  # every key opposes query 0 (score -32) ...
    for tile in (4, 12):
        key[0, 0, 16 * tile : 16 * tile + 16] = unit * (torch.rand(16, 32) + 0.1)  # ... but the sampled ones
    key[0, 0, 200:230, :10] *= -1  # a third level, between
    expected, expected_keep = loop_reference(query, key, value, full, num_kept, case.alpha)
    out, keep = hamming_topk_prefill(query, key, value, None, False, num_kept, case.alpha, return_keep=True,
                                     config=config)  # fmt: skip
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_prefill_passes_and_floors():
    """The two passes called one by one (as the benchmark times them) give the whole call's result; the floor
    variants (no counting, dense softmax) run."""
    case = PrefillCase(batch=1, num_heads=2, num_kv_heads=1, query_len=32, num_keys=64, causal=True, top_n=8)
    query, key, value, mask, full, num_kept = make_prefill_inputs(case, seed=8)
    prep = prepare_prefill(query, key, value, mask, True, num_kept, case.alpha)
    stats = prefill_threshold_pass(prep)
    out = prefill_attend_pass(prep, stats)
    assert torch.equal(out, hamming_topk_prefill(query, key, value, mask, True, num_kept, case.alpha))
    prefill_threshold_pass(prep, count=False)
    dense = prefill_attend_pass(prep, stats, select=False)  # every valid key, softmax shifted by the row's max
    unit_q = torch.where(query >= 0, 1.0, -1.0)
    unit_k = torch.where(key >= 0, 1.0, -1.0).repeat_interleave(2, dim=1)
    logits = (case.alpha * unit_q @ unit_k.transpose(-1, -2)).masked_fill(~full, float("-inf"))
    expected = torch.softmax(logits, -1) @ value.repeat_interleave(2, dim=1)
    assert torch.allclose(dense, expected, atol=1e-5)


def test_prefill_scalar_num_kept_and_empty_shapes():
    case = PrefillCase(batch=1, query_len=20, num_keys=20, top_n=5)
    query, key, value, _, full, num_kept = make_prefill_inputs(case, seed=9)
    out = hamming_topk_prefill(query, key, value, None, False, 5, case.alpha)  # an int N for every row
    assert torch.allclose(out.double(), loop_reference(query, key, value, full, num_kept, case.alpha)[0], atol=1e-5)
    empty = hamming_topk_prefill(query[:, :, :0], key, value, None, False, 5, case.alpha)
    assert empty.shape == (1, 2, 0, 32)
    out, keep = hamming_topk_prefill(query, key[:, :, :0], value[:, :, :0], None, False, 0, case.alpha,
                                     return_keep=True)  # fmt: skip
    assert bool((out == 0).all()) and keep.shape == (1, 2, 20, 0)


def test_prefill_strided_inputs():
    """Transposed views (a (B, t, H, d) projection seen as (B, H, t, d), values with a non-unit last stride)."""
    case = PrefillCase(batch=1, num_heads=2, num_kv_heads=1, query_len=20, num_keys=40, head_dim=64, causal=True,
                       patterns=3, top_n=6)  # fmt: skip
    query, key, value, mask, full, num_kept = make_prefill_inputs(case, seed=10)
    expected, expected_keep = loop_reference(query, key, value, full, num_kept, case.alpha)
    query_t = query.transpose(1, 2).contiguous().transpose(1, 2)
    key_t = key.transpose(1, 2).contiguous().transpose(1, 2)
    value_t = value.transpose(-1, -2).contiguous().transpose(-1, -2)
    out, keep = hamming_topk_prefill(query_t, key_t, value_t, mask, True, num_kept, case.alpha, return_keep=True)
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES[:4], ids=lambda case: case.id)
@pytest.mark.parametrize("sink_keys", [1, 2])
def test_prefill_keeps_the_attention_sinks(case, sink_keys):
    """Each row keeps its top N and its first `sink_keys` valid keys (after left padding, in a random per-row mask,
    under the causal limit), as the float64 loop does; the sinks change some rows' kept sets."""
    _, keep, num_kept = check(case, seed=2, sink_keys=sink_keys)
    assert (keep.sum(-1) > num_kept).any()
