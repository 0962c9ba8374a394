"""Inputs with heavy ties and masks, and a float64 per-row loop: the ground truth of the kernel tests.

Shared by `test_kernels.py` and `interpret_triton_cases.py` (the Triton kernels under the interpreter, in a
subprocess); not collected itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    """One decode-attention problem; `patterns` > 0 draws keys/queries from that many sign patterns (heavy ties)."""

    batch: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    query_len: int = 1
    num_keys: int = 150
    head_dim: int = 32
    value_dim: int = 32
    top_n: int = 20
    mask: str = "none"  # none | padding | causal | padding_causal | random | empty_rows
    patterns: int = 6
    alpha: float = 0.35

    @property
    def id(self) -> str:
        return (
            f"B{self.batch}-H{self.num_heads}/{self.num_kv_heads}-q{self.query_len}-n{self.num_keys}"
            f"-d{self.head_dim}-dv{self.value_dim}-N{self.top_n}-{self.mask}-p{self.patterns}-a{self.alpha}"
        )


def _signed(shape: tuple[int, ...], patterns: int, generator: torch.Generator) -> torch.Tensor:
    """Random normal rows whose signs repeat among `patterns` choices (all distinct if patterns == 0)."""
    magnitudes = torch.rand(shape, generator=generator) + 0.05
    if patterns <= 0:
        return torch.randn(shape, generator=generator)
    pool = torch.randint(0, 2, (patterns, shape[-1]), generator=generator) * 2 - 1
    choice = torch.randint(0, patterns, shape[:-1], generator=generator)
    return pool[choice].float() * magnitudes


def make_inputs(case: Case, seed: int = 0, value_dtype: torch.dtype = torch.float32):
    """(query, key, value, valid_mask) on the CPU; exact zeros in the queries check sign(0) = +1."""
    generator = torch.Generator().manual_seed(seed)
    b, hq, hkv, q, n = case.batch, case.num_heads, case.num_kv_heads, case.query_len, case.num_keys
    query = _signed((b, hq, q, case.head_dim), case.patterns, generator)
    query[..., :2] = 0.0
    key = _signed((b, hkv, n, case.head_dim), case.patterns, generator)
    key[..., -1] = 0.0
    value = torch.randn(b, hkv, n, case.value_dim, generator=generator).to(value_dtype)
    return query, key, value, make_mask(case, generator)


def make_mask(case: Case, generator: torch.Generator) -> torch.Tensor | None:
    b, hq, q, n = case.batch, case.num_heads, case.query_len, case.num_keys
    if case.mask == "none":
        return None
    valid = torch.ones(b, 1, q, n, dtype=torch.bool)
    if "padding" in case.mask:
        # left padding of a different length per sequence (the first sequence unpadded)
        for row in range(1, b):
            valid[row, :, :, : min(n - 1, 7 * row + 3)] = False
    if case.mask == "long_padding":
        # left padding longer than a block of keys: none, about half of the keys, all but 12 (fewer than N + sinks)
        for row in range(1, b):
            valid[row, :, :, : n // 2 if row == 1 else n - 12] = False
    if "causal" in case.mask:
        positions = torch.arange(q)[:, None] + (n - q)
        valid &= torch.arange(n)[None, :] <= positions
    if case.mask == "random":
        valid = torch.rand(b, hq, q, n, generator=generator) > 0.4
    if case.mask == "empty_rows":
        valid = torch.rand(b, 1, q, n, generator=generator) > 0.5
        valid[0, :, 0] = False  # a query that may attend to nothing
        valid[-1, :, -1, :-3] = False  # one with fewer valid keys than N
    return valid


def loop_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid_mask: torch.Tensor | None,
    top_n: int | torch.Tensor,
    alpha: float,
    sink_keys: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """METHOD.md section 1 row by row in float64: sort the valid keys by (-Sb, index), keep the first N (one N, or
    each row's from a tensor broadcastable to (B, Hq, q)), and the `sink_keys` valid keys of lowest index."""
    b_size, hq, q_len, _ = query.shape
    hkv, n = key.shape[1], key.shape[2]
    group = hq // hkv
    unit_q = torch.where(query >= 0, 1.0, -1.0).double()
    unit_k = torch.where(key >= 0, 1.0, -1.0).double()
    values = value.double()
    valid = (
        torch.ones(b_size, hq, q_len, n, dtype=torch.bool)
        if valid_mask is None
        else valid_mask.expand(b_size, hq, q_len, n)
    )
    out = torch.zeros(b_size, hq, q_len, value.shape[-1], dtype=torch.float64)
    keep = torch.zeros(b_size, hq, q_len, n, dtype=torch.bool)
    for b in range(b_size):
        for h in range(hq):
            kv = h // group
            for i in range(q_len):
                scores = (unit_k[b, kv] @ unit_q[b, h, i]).tolist()
                candidates = [j for j in range(n) if valid[b, h, i, j]]
                candidates.sort(key=lambda j: (-scores[j], j))
                row_n = top_n if isinstance(top_n, int) else int(top_n.expand(b_size, hq, q_len)[b, h, i])
                kept = candidates[: max(0, row_n)]
                kept += [j for j in sorted(candidates)[:sink_keys] if j not in kept]
                if not kept:
                    continue
                logits = [alpha * scores[j] for j in kept]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                total = sum(weights)
                for j, w in zip(kept, weights):
                    out[b, h, i] += (w / total) * values[b, kv, j]
                    keep[b, h, i, j] = True
    return out, keep


# Small problems that cover the selection rules: ties at the threshold (few sign patterns), splits, GQA, masks
# (padding, causal, per-head random, rows with no / too few valid keys), N > valid keys, negative alpha, d = 32..256.
SELECTION_CASES = [
    Case(),
    Case(patterns=2, top_n=37),
    Case(num_heads=8, num_kv_heads=2, query_len=2, mask="causal", num_keys=160, head_dim=64, top_n=30),
    Case(batch=3, num_heads=2, num_kv_heads=2, mask="padding", num_keys=130, head_dim=64, value_dim=64, top_n=50),
    Case(num_heads=4, num_kv_heads=1, query_len=4, mask="padding_causal", num_keys=97, top_n=16),
    Case(mask="random", num_keys=180, top_n=25, patterns=4, head_dim=128, value_dim=16),
    Case(mask="empty_rows", query_len=2, num_keys=70, top_n=12),
    Case(num_keys=40, top_n=500, mask="padding", patterns=0),
    Case(num_heads=2, num_kv_heads=2, num_keys=90, top_n=10, alpha=-0.5),
    Case(batch=1, num_heads=2, num_kv_heads=1, num_keys=80, head_dim=256, value_dim=32, top_n=9, patterns=3),
    # programs of 4 rows (the GQA shape's group), and of 3 rows in a block of 4 (an absent row)
    Case(num_heads=8, num_kv_heads=2, mask="random", num_keys=300, head_dim=128, value_dim=64, top_n=40, patterns=2),
    Case(batch=1, num_heads=3, num_kv_heads=1, mask="padding", num_keys=120, top_n=25, patterns=3),
]


def check_triton_decode(case: Case, seed: int, device: str = "cpu", sink_keys: int = 0, **options) -> torch.Tensor:
    """Runs the Triton `hamming_topk_decode` on the case's inputs (float32 values, keys packed) on `device` and asserts
    that it keeps exactly the float64 loop's keys and that its outputs agree to 1e-5 without NaN; returns the keep mask
    (on the CPU) for further checks. Imports the kernels lazily: the interpreter run must set TRITON_INTERPRET first."""
    from had_hf.kernels import pack_sign_bits
    from had_hf.kernels.triton_decode import hamming_topk_decode

    query, key, value, valid = make_inputs(case, seed=seed)
    expected, expected_keep = loop_reference(query, key, value, valid, case.top_n, case.alpha, sink_keys)
    if sink_keys:
        options["sink_keys"] = sink_keys

    def to_device(x):
        return None if x is None else x.to(device)

    out, keep = hamming_topk_decode(
        to_device(query),
        to_device(pack_sign_bits(key)),
        to_device(value),
        to_device(valid),
        case.top_n,
        case.alpha,
        return_keep=True,
        **options,
    )
    assert torch.equal(keep.cpu(), expected_keep), case.id
    assert not out.isnan().any()
    assert torch.allclose(out.double().cpu(), expected, atol=1e-5, rtol=1e-5), case.id
    return keep.cpu()
