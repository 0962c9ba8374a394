"""The Triton kernels on the CPU through Triton's interpreter, at small shapes.

Run by `test_kernels.py::test_triton_kernels_under_interpreter` in a subprocess with `TRITON_INTERPRET=1` (the
variable must be set before triton is imported, so it cannot share a process with GPU tests). Directly:

    TRITON_INTERPRET=1 PYTHONPATH=src python -m pytest -q tests/kernels/interpret_triton_cases.py
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

from kernel_helpers import SELECTION_CASES, Case, check_triton_decode, loop_reference, make_inputs  # noqa: E402

from had_hf.kernels import pack_sign_bits, reference_hamming_topk_attention  # noqa: E402
from had_hf.kernels.triton_decode import hamming_topk_decode, triton_pack_sign_bits  # noqa: E402
from had_hf.selection import kept_counts  # noqa: E402


@pytest.mark.parametrize("dim", [32, 64, 128, 256])
def test_pack_kernel_matches_torch(dim):
    x = torch.randn(2, 3, 37, dim)
    x[0, 0, 0, :5] = 0.0
    strided = x.transpose(1, 2)  # (B, t, H, d) view: the kernel reads strides, no copy
    assert torch.equal(triton_pack_sign_bits(strided), pack_sign_bits(strided))
    assert torch.equal(triton_pack_sign_bits(x[0, 0]), pack_sign_bits(x[0, 0]))
    # more than 3 leading dimensions (flattened for the kernel): the words keep the input's shape
    x5 = torch.randn(2, 3, 2, 5, dim)
    packed = triton_pack_sign_bits(x5)
    assert packed.shape == (2, 3, 2, 5, dim // 32) and torch.equal(packed, pack_sign_bits(x5))


@pytest.mark.parametrize("dim", [32, 128])
def test_unit_signs_kernel_matches_torch(dim):
    from had_hf.kernels.sign_pack_kernel import triton_unit_signs

    x = torch.randn(2, 3, 37, dim)
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, float("nan")])  # +1, +1 (x >= 0) and -1 (NaN >= 0 is False)
    strided = x.transpose(1, 2)  # (B, t, H, d) view: read through its strides
    for dtypes in [(torch.float16, torch.int8), (torch.int8,)]:
        units = triton_unit_signs(strided, dtypes)
        assert set(units) == set(dtypes)
        for dtype, unit in units.items():
            assert unit.is_contiguous() and unit.shape == strided.shape and unit.dtype == dtype
            assert torch.equal(unit, torch.where(strided >= 0, 1, -1).to(dtype))
    assert torch.equal(
        triton_unit_signs(x[0, 0], (torch.float16,))[torch.float16], torch.where(x[0, 0] >= 0, 1.0, -1.0).half()
    )
    x5 = torch.randn(2, 3, 2, 5, dim)  # more than 3 leading dimensions: flattened for the kernel, shape kept
    assert torch.equal(triton_unit_signs(x5, (torch.int8,))[torch.int8], torch.where(x5 >= 0, 1, -1).to(torch.int8))
    with pytest.raises(ValueError, match="float16 and/or int8 outputs"):
        triton_unit_signs(x, (torch.bfloat16,))


# (num_splits, block_n, hist_block_elements, gather_block, single_row_dot): several splits with ties across their
# borders, several blocks per split (the running tie count), several counting blocks, several gathers of kept value
# rows, and both accumulations of one-row programs
LAUNCHES = [(None, 256, 2048, 64, False), (3, 16, 32, 16, True)]


@pytest.mark.parametrize("case", SELECTION_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: f"splits{launch[0]}-block{launch[1]}")
def test_decode_kernel_selects_exactly(case: Case, launch):
    num_splits, block_n, hist_elements, gather_block, single_row_dot = launch
    check_triton_decode(
        case,
        seed=3,
        short_kernel=False,
        num_splits=num_splits,
        block_n=block_n,
        hist_block_elements=hist_elements,
        gather_block=gather_block,
        single_row_dot=single_row_dot,
    )


# (case, single_row_dot): one-row programs (multiply-adds and tl.dot), groups of 8 rows (R_BLOCK 8), 4 rows with heavy
# ties and 3 rows (a padding row), over several splits and several gathered tiles per program
GATHER_STAGES_CASES = [
    (SELECTION_CASES[1], False),
    (SELECTION_CASES[1], True),
    (SELECTION_CASES[2], False),
    (SELECTION_CASES[10], False),
    (SELECTION_CASES[11], False),
]


@pytest.mark.parametrize("case, single_row_dot", GATHER_STAGES_CASES, ids=lambda x: getattr(x, "id", str(x)))
def test_decode_kernel_gather_variants_equal_the_default(case: Case, single_row_dot: bool):
    """The gather loop left to Triton's pipeliner (`gather_stages` > 0) and the gather interleaved with the selection
    keep the reference's keys, and sum the same tiles in the same order as the default: the same output, bit for
    bit."""
    options = dict(num_splits=3, block_n=16, gather_block=16, single_row_dot=single_row_dot)
    check_triton_decode(case, seed=17, gather_stages=2, interleave_gather=True, **options)
    query, key, value, valid = make_inputs(case, seed=17)
    outputs = [
        hamming_topk_decode(query, pack_sign_bits(key), value, valid, case.top_n, case.alpha, **variant, **options)
        for variant in ({}, dict(gather_stages=2), dict(interleave_gather=True))
    ]
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])


# (case, num_splits, distance_splits, split_block, num_stages, num_warps): more splits than a tile of the last programs'
# reductions, so that they loop over tiles (the last one partial), and heavy ties whose quota is handed out across
# several tiles (the carry of the prefix sum); R_BLOCK 2 and 8; fewer, longer splits for the distance kernel than for
# the two after it; per-kernel num_stages, num_warps and max_registers (ignored by the interpreter: the wrapper's plumbing,
# and the warps' register budget of the split tiles)
SPLIT_TILE_CASES = [
    (Case(num_keys=700, top_n=300, mask="padding", patterns=1), 11, 5, 2, (1, None, 2), (None, 2, 8)),
    (
        Case(num_heads=8, num_kv_heads=2, query_len=2, mask="causal", num_keys=700, top_n=150, patterns=2),
        11,
        None,
        4,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    "case, num_splits, distance_splits, split_block, num_stages, num_warps",
    SPLIT_TILE_CASES,
    ids=lambda x: getattr(x, "id", str(x)),
)
def test_decode_kernel_reduces_split_tiles(
    case: Case, num_splits, distance_splits, split_block, num_stages, num_warps
):
    keep = check_triton_decode(
        case,
        seed=13,
        num_splits=num_splits,
        distance_splits=distance_splits,
        split_block=split_block,
        num_stages=num_stages,
        num_warps=num_warps,
        max_registers=(None, None, 128),
    )
    # the kept ties reach past the first tile of splits (64 keys each): the quota crossed tiles
    assert int((keep * torch.arange(case.num_keys)).max()) >= 64 * split_block


@pytest.mark.parametrize(
    "case, split_group, gather_stages",
    [(SPLIT_TILE_CASES[1][0], 2, 0), (SPLIT_TILE_CASES[0][0], 4, 2), (SPLIT_TILE_CASES[1][0], 16, 2)],
    ids=lambda x: getattr(x, "id", str(x)),
)
def test_decode_kernel_attend_split_groups(case: Case, split_group, gather_stages):
    """Attend programs over several consecutive splits of the fine count (their tie quotas summed: the heavy ties are
    cut inside a group; the last group partial; one group over all 11 splits) keep exactly the reference's keys."""
    check_triton_decode(
        case, seed=13, num_splits=11, attend_split_group=split_group, gather_stages=gather_stages, split_block=2
    )


def test_decode_kernel_cached_layouts_across_growing_and_shrinking_calls():
    """Decode steps reuse the workspace's cached views while their layout holds (generation: n grows by one per step),
    rebuild them when it changes, and drop them when a buffer grows; every call must still be exact."""
    from had_hf.kernels.decode_launch import _Workspace

    sequence = [130, 131, 191, 192, 193, 900, 131, 131]  # same layout twice, a new code stride, a reallocation, back
    for step, num_keys in enumerate(sequence):
        check_triton_decode(
            Case(num_keys=num_keys, top_n=40, mask="padding", patterns=3), seed=20 + step, num_splits=2
        )
        workspace = _Workspace.get(torch.device("cpu"))
        # every cached view lies in the live buffers (a reallocation dropped the views of the old ones)
        live = {buffer.untyped_storage().data_ptr() for buffer in workspace.buffers.values()}
        for views in workspace.layouts.values():
            assert all(view.untyped_storage().data_ptr() in live for view in views)


def test_decode_kernel_bf16_values_and_strided_inputs():
    case = Case(num_heads=8, num_kv_heads=2, query_len=2, mask="causal", num_keys=100, top_n=15)
    query, key, value, valid = make_inputs(case, seed=5)
    expected, expected_keep = loop_reference(query, key, value.bfloat16(), valid, case.top_n, case.alpha)
    # strided views, as a growing cache and a transposed projection hand them over
    key_buffer = torch.zeros(case.batch, case.num_kv_heads, 128, 1, dtype=torch.int32)
    key_buffer[:, :, : case.num_keys] = pack_sign_bits(key)
    value_buffer = torch.zeros(case.batch, case.num_kv_heads, 128, case.value_dim, dtype=torch.bfloat16)
    value_buffer[:, :, : case.num_keys] = value.bfloat16()
    query_t = query.transpose(1, 2).contiguous().transpose(1, 2)
    out, keep = hamming_topk_decode(
        query_t,
        key_buffer[:, :, : case.num_keys],
        value_buffer[:, :, : case.num_keys],
        valid,
        case.top_n,
        case.alpha,
        num_splits=2,
        return_keep=True,
    )
    assert out.dtype == torch.bfloat16
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(out.double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("extra_keys", [0, 16])
def test_decode_kernel_packed_counters_at_their_limit(extra_keys):
    # the longest split the host allows at 16-key counting blocks (MAX_ITERATIONS less its margin for the 64-key
    # rounding and the distance kernel's tail blocks), every key at the same distance: each lane's 7-bit coarse counter
    # field reaches 121 of its 127, and its 4-bit fine counter field is added into the totals every NIBBLE_TILES
    # blocks, 8 times over; 16 keys more, and the host must cut the keys into two splits
    from had_hf.kernels.triton_decode import MAX_ITERATIONS

    num_keys = (MAX_ITERATIONS - 2 - 64 // 16) * 16 + extra_keys
    case = Case(batch=1, num_heads=1, num_kv_heads=1, num_keys=num_keys, top_n=100, patterns=1)
    keep = check_triton_decode(case, seed=11, num_splits=1, hist_block_elements=16)
    assert int(keep.sum()) == case.top_n


def test_decode_kernel_reads_int32_words_it_cannot_view_as_int64():
    """From d = 64 the kernel reads key words as int64: a view where the layout allows it, a copy where an odd offset
    (in int32 words) does not. Both must select exactly the reference's keys."""
    case = Case(num_heads=4, num_kv_heads=2, mask="padding", num_keys=150, head_dim=64, top_n=20, patterns=3)
    query, key, value, valid = make_inputs(case, seed=9)
    expected, expected_keep = loop_reference(query, key, value, valid, case.top_n, case.alpha)
    words = pack_sign_bits(key)  # (B, Hkv, n, 2) int32
    buffer = torch.zeros(*words.shape[:-1], 3, dtype=torch.int32)
    buffer[..., 1:] = words
    odd = buffer[..., 1:]  # one int32 past an 8-byte boundary: no int64 view
    assert odd.storage_offset() % 2 == 1
    for key_words, short_kernel in itertools.product((words, odd), (False, True)):
        out, keep = hamming_topk_decode(
            query, key_words, value, valid, case.top_n, case.alpha, short_kernel=short_kernel, return_keep=True
        )
        assert torch.equal(keep, expected_keep)
        assert torch.allclose(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [SELECTION_CASES[2], SELECTION_CASES[4], SELECTION_CASES[6]], ids=lambda c: c.id)
@pytest.mark.parametrize("short_kernel", [False, True], ids=["three-kernels", "short"])
@pytest.mark.parametrize("ratio", [0.3, 0.1])
def test_decode_kernel_applies_the_ratio_rule(case: Case, short_kernel: bool, ratio: float):
    """The ratio rule's N per row, counted and computed by the kernels: the float64 loop's kept keys given the N of
    `kept_counts` (the rule) for each row's valid keys."""
    query, key, value, valid = make_inputs(case, seed=5)
    counts = torch.full((1, 1, case.query_len), case.num_keys) if valid is None else valid.sum(-1)
    rows_n = kept_counts(counts, None, ratio)
    expected, expected_keep = loop_reference(query, key, value, valid, rows_n, case.alpha)
    out, keep = hamming_topk_decode(query, pack_sign_bits(key), value, valid, None, case.alpha, top_n_ratio=ratio,
                                    short_kernel=short_kernel, return_keep=True)  # fmt: skip
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


# Ratios whose float64 product lands just above an integer for some counts (0.1 * 30 = 3.0000000000000004: N = 4, where
# a float32 product gives 3), the generation benchmarks' 0.117, 1/3, the ends of (0, 1], and random ones
KEPT_COUNT_RATIOS = [0.1, 0.117, 0.3, 1 / 3, 0.7, 0.9, 1.0, 2**-30, 1 - 2**-53, 0.123456789]


def test_kernels_kept_count_equals_the_rule():
    """The kernels' copy of the N rule (`decode_split_k._kept_count`) gives `kept_counts`' N for every count up to
    2^17 and some up to 2^31 - 1, for fixed N and ratios (float64 ceil exactness included)."""
    from kept_count_kernel import kernel_kept_counts

    counts = torch.cat([torch.arange(1 << 17), torch.tensor([2**24 + 1, 2**30 + 3, 2**31 - 1])]).to(torch.int32)
    ratios = (
        KEPT_COUNT_RATIOS + torch.rand(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    )
    for ratio in ratios:
        assert torch.equal(kernel_kept_counts(counts, None, ratio), kept_counts(counts, None, ratio)), ratio
    for top_n in (1, 37, 5000, 2**31 - 1):
        assert torch.equal(kernel_kept_counts(counts, top_n, None), kept_counts(counts, top_n, None)), top_n
    # the counts tell a float32 rule apart from the rule
    float32_rule = torch.ceil(counts.float() * torch.tensor(0.1)).to(torch.int32).clamp(min=1).minimum(counts)
    assert not torch.equal(float32_rule, kept_counts(counts, None, 0.1))


class _EagerOps(TorchDispatchMode):
    """Records the PyTorch ops run outside the Triton launches (the interpreter's own copies of the launch arguments
    are left out), and the launched kernels' names."""

    def __init__(self):
        super().__init__()
        self.ops: list[torch._ops.OpOverload] = []
        self.launched: list[str] = []
        self.in_launch = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_launch:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def recording_launches(self, grid_call):
        def recorded(executor, *args, **kwargs):
            self.launched.append(executor.fn.__name__)
            self.in_launch += 1
            try:
                return grid_call(executor, *args, **kwargs)
            finally:
                self.in_launch -= 1

        return recorded

    def kernel_ops(self) -> list[str]:
        """The recorded ops that launch a GPU kernel: all but views (no data touched) and allocations."""
        allocations = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default)
        return [str(op) for op in self.ops if not (op.is_view or op in allocations)]


@pytest.mark.parametrize("short_kernel", [True, False], ids=["short", "three-kernels"])
@pytest.mark.parametrize("rule", [(None, 0.117), (20, None)], ids=["ratio", "fixed"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
def test_decode_op_path_runs_no_pytorch_kernels(monkeypatch, short_kernel: bool, rule, masked: bool):
    """One decode call of the op's CUDA path (`had_hf.kernels._decode`, which `triton_kernel_for` returns for decode
    shapes) at a generation step of a static packed cache (the projection's transposed queries, the whole key and bf16
    value buffers, a (B, 1, 1, n) mask) runs, besides its Triton launches, only views and allocations: no PyTorch
    kernel, which the opaque custom op would run eagerly inside a compiled step. The scratch is allocated afresh, as
    under CUDA-graph capture; the three-kernel path then zeroes its tickets, the one PyTorch kernel it keeps (a memset
    in the graph)."""
    from triton.runtime import interpreter

    from had_hf.kernels import _decode, decode_launch
    from had_hf.kernels.decode_launch import _Workspace

    monkeypatch.setattr(decode_launch, "SHORT_BY_DEFAULT", short_kernel)
    monkeypatch.setattr(_Workspace, "get", classmethod(lambda cls, device: cls(device)))
    batch, num_heads, num_kv_heads, n_keys, dim = 2, 8, 2, 200, 64
    generator = torch.Generator().manual_seed(4)
    # float32 queries: the interpreter misreads bf16 ones (their signs)
    query = torch.randn(batch, 1, num_heads, dim, generator=generator).transpose(1, 2)
    key_words = pack_sign_bits(torch.randn(batch, num_kv_heads, n_keys, dim, generator=generator))
    value = torch.randn(batch, num_kv_heads, n_keys, dim, generator=generator).bfloat16()
    filled = torch.arange(n_keys) < torch.tensor([150, 170])[:, None]  # the cache's written slots
    mask = filled[:, None, None, :] if masked else None
    top_n, ratio = rule
    recorder = _EagerOps()
    executor = interpreter.GridExecutor
    monkeypatch.setattr(executor, "__call__", recorder.recording_launches(executor.__call__))
    with recorder:
        out = _decode(query, key_words, value, mask, False, top_n, ratio, 0.2)
    split_k = ["_distance_kernel", "_fine_count_kernel", "_attend_kernel"]
    assert recorder.launched == (["_short_decode_kernel"] if short_kernel else split_k)
    assert recorder.kernel_ops() == ([] if short_kernel else ["aten.zeros.default"]), recorder.ops
    expected = reference_hamming_topk_attention(query, key_words, value, mask, top_n, 0.2, top_n_ratio=ratio)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------------------------------
# The short-context kernel: one program per (batch, kv head, row block) over all keys
# ---------------------------------------------------------------------------------------------------------------------

# beyond SELECTION_CASES (d <= 128 there): GQA groups of 3 (a padding row in blocks of 4; 6 rows: a partial second
# block) and 4 over several positions, N = 1, N = n, heavy ties cut inside a tile, d = 32 / 64 / 128
SHORT_CASES = [
    *(case for case in SELECTION_CASES if case.head_dim <= 128),
    Case(batch=2, num_heads=6, num_kv_heads=2, query_len=2, mask="padding_causal", num_keys=140, top_n=1, patterns=2),
    Case(batch=1, num_heads=8, num_kv_heads=2, query_len=4, mask="random", num_keys=96, top_n=96, head_dim=64),
    Case(batch=2, num_heads=4, num_kv_heads=4, query_len=3, num_keys=200, top_n=70, patterns=1, head_dim=128),
]


@pytest.mark.parametrize("case", SHORT_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("row_block", [1, 4])
def test_short_kernel_selects_exactly(case: Case, row_block: int):
    """Exactly the float64 loop's kept keys and outputs, in programs of one row and of up to 4 (several selection and
    counting tiles per program, several gathered tiles)."""
    check_triton_decode(
        case, seed=3, short_kernel=True, short_row_block=row_block, block_n=64, hist_block_elements=64, gather_block=16
    )


@pytest.mark.parametrize("case", [SHORT_CASES[2], SHORT_CASES[10], SHORT_CASES[12]], ids=lambda case: case.id)
def test_short_kernel_equals_the_three_kernel_path(case: Case):
    """The same kept keys as the split-K path and the same outputs up to the order of the sums; with no option the
    dispatcher picks the short kernel at these lengths."""
    query, key, value, valid = make_inputs(case, seed=8)
    args = (query, pack_sign_bits(key), value, valid, case.top_n, case.alpha)
    short, short_keep = hamming_topk_decode(*args, short_kernel=True, return_keep=True)
    split, split_keep = hamming_topk_decode(*args, num_splits=3, return_keep=True)
    assert torch.equal(short_keep, split_keep) and short_keep.any()
    torch.testing.assert_close(short, split, atol=1e-6, rtol=1e-6)
    default, default_keep = hamming_topk_decode(*args, return_keep=True)
    assert torch.equal(default_keep, short_keep)
    assert torch.equal(default, short)
    assert torch.equal(hamming_topk_decode(*args, num_splits=3), split)
    # the gather prefetched by hand (the default) or pipelined by Triton: the same tiles in the same order
    assert torch.equal(hamming_topk_decode(*args, short_kernel=True, gather_stages=3), short)


def test_short_kernel_counts_past_the_packed_counter_limit():
    """Every key at the same distance and 16-key counting tiles: each lane's 7-bit coarse counters would pass 127 over
    the 2,100 keys and its 4-bit fine counters 15; the program adds them into int32 totals every MAX_ITERATIONS and
    NIBBLE_TILES tiles. N cuts the ties."""
    case = Case(batch=1, num_heads=1, num_kv_heads=1, num_keys=2100, top_n=1500, patterns=1)
    keep = check_triton_decode(case, seed=11, short_kernel=True, hist_block_elements=16, block_n=1024)
    assert torch.equal(keep[0, 0, 0], torch.arange(case.num_keys) < case.top_n)


def test_short_kernel_bf16_values_and_strided_inputs():
    case = Case(num_heads=6, num_kv_heads=2, query_len=2, mask="causal", num_keys=100, top_n=15)
    query, key, value, valid = make_inputs(case, seed=5)
    expected, expected_keep = loop_reference(query, key, value.bfloat16(), valid, case.top_n, case.alpha)
    key_buffer = torch.zeros(case.batch, case.num_kv_heads, 128, 1, dtype=torch.int32)
    key_buffer[:, :, : case.num_keys] = pack_sign_bits(key)
    value_buffer = torch.zeros(case.batch, case.num_kv_heads, 128, case.value_dim, dtype=torch.bfloat16)
    value_buffer[:, :, : case.num_keys] = value.bfloat16()
    query_t = query.transpose(1, 2).contiguous().transpose(1, 2)
    for row_block in (1, 2):
        out, keep = hamming_topk_decode(
            query_t,
            key_buffer[:, :, : case.num_keys],
            value_buffer[:, :, : case.num_keys],
            valid,
            case.top_n,
            case.alpha,
            short_row_block=row_block,
            return_keep=True,
        )
        assert out.dtype == torch.bfloat16
        assert torch.equal(keep, expected_keep)
        assert torch.allclose(out.double(), expected, atol=2e-2, rtol=2e-2)


# attention sinks (`sink_keys`) on both paths: no mask (every row's sinks are keys 0..k-1), left padding and random
# masks (each row's own, from `selection.sink_ends`), causal rows, rows with fewer valid keys than N + k, empty rows,
# GQA groups of 8 rows (the attend kernel's (R, BLOCK_N) tiles), left padding longer than the kernels' scan block
# (`triton_common.SINK_SCAN_N`: rows whose first valid keys lie several blocks in)
SINK_CASES = [SELECTION_CASES[i] for i in (0, 2, 3, 4, 5, 6)] + [
    Case(batch=3, num_heads=4, num_kv_heads=2, mask="long_padding", num_keys=300, top_n=20, patterns=3)
]
SINK_PATHS = {
    "short-1row": dict(short_kernel=True, short_row_block=1, block_n=64, hist_block_elements=64, gather_block=16),
    "short-4rows": dict(short_kernel=True, short_row_block=4, block_n=64, hist_block_elements=64, gather_block=16),
    "split-k": dict(short_kernel=False, num_splits=3, block_n=16, hist_block_elements=32, gather_block=16),
}


@pytest.mark.parametrize("case", SINK_CASES, ids=lambda case: case.id)
@pytest.mark.parametrize("path", SINK_PATHS, ids=str)
@pytest.mark.parametrize("sink_keys", [1, 3])
def test_decode_kernels_keep_the_attention_sinks(case: Case, path: str, sink_keys: int):
    """Each row keeps its top N and its first `sink_keys` valid keys, as the float64 loop does; the sinks change the
    kept sets of some rows (the test would fail without them)."""
    keep = check_triton_decode(case, seed=3, sink_keys=sink_keys, **SINK_PATHS[path])
    query, key, value, valid = make_inputs(case, seed=3)
    _, top_n_alone = loop_reference(query, key, value, valid, case.top_n, case.alpha)
    assert not torch.equal(keep, top_n_alone)


def test_decode_kernels_refuse_sinks_with_negative_alpha():
    case = SELECTION_CASES[8]
    query, key, value, valid = make_inputs(case)
    with pytest.raises(ValueError, match="sinks need alpha >= 0"):
        hamming_topk_decode(query, pack_sign_bits(key), value, valid, case.top_n, case.alpha, sink_keys=1)
