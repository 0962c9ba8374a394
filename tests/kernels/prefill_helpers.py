"""Prefill problems (causal, padding, grouped-query, heavy ties), checked against the float64 per-row loop of METHOD.md
section 1 that the decode tests use (`kernel_helpers.loop_reference`, with each row's valid keys and kept count).

Shared by `test_prefill_kernel.py` (GPU cases) and `interpret_prefill_cases.py` (the Triton kernels under the
interpreter, in a subprocess); not collected itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefillCase:
    """One prefill problem. `patterns` > 0 draws queries and keys from that many sign patterns (heavy ties); `mask`:
    none | padding (left padding per sequence, a (B, 1, 1, n) mask) | rows (a random (B, Hq, q, n) mask with some
    empty rows); `top_n` is clamped per row to its valid keys, as the caller does."""

    batch: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    query_len: int = 40
    num_keys: int = 40
    head_dim: int = 32
    value_dim: int = 32
    top_n: int = 7
    causal: bool = False
    mask: str = "none"
    patterns: int = 0
    alpha: float = 0.3
    dtype: torch.dtype = torch.float32

    @property
    def id(self) -> str:
        return (
            f"B{self.batch}-H{self.num_heads}/{self.num_kv_heads}-q{self.query_len}-n{self.num_keys}"
            f"-d{self.head_dim}-dv{self.value_dim}-N{self.top_n}-{'causal' if self.causal else 'full'}-{self.mask}"
            f"-p{self.patterns}-{str(self.dtype).split('.')[-1]}"
        )


def _signed(shape: tuple[int, ...], patterns: int, generator: torch.Generator) -> torch.Tensor:
    if patterns <= 0:
        return torch.randn(shape, generator=generator)
    pool = torch.randint(0, 2, (patterns, shape[-1]), generator=generator) * 2 - 1
    choice = torch.randint(0, patterns, shape[:-1], generator=generator)
    return pool[choice].float() * (torch.rand(shape, generator=generator) + 0.05)


def make_prefill_inputs(case: PrefillCase, seed: int = 0):
    """(query, key, value, valid_mask or None, full_valid (B, Hq, q, n) incl. causality, num_kept (B, Hq, q)) on the
    CPU; queries and keys in the case's dtype, with exact zeros (sign(0) = +1)."""
    generator = torch.Generator().manual_seed(seed)
    b, hq, hkv, q, n = case.batch, case.num_heads, case.num_kv_heads, case.query_len, case.num_keys
    query = _signed((b, hq, q, case.head_dim), case.patterns, generator)
    query[..., :2] = 0.0
    key = _signed((b, hkv, n, case.head_dim), case.patterns, generator)
    key[..., -1] = 0.0
    value = torch.randn(b, hkv, n, case.value_dim, generator=generator)
    mask = None
    if case.mask == "padding":
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        for row in range(1, b):
            mask[row, ..., : min(n - 1, 5 * row + 3)] = False
    elif case.mask == "rows":
        mask = torch.rand(b, hq, q, n, generator=generator) > 0.3
        mask[0, 0, 0] = False  # a query with no valid key
        mask[-1, -1, -1, :-3] = False  # one with fewer valid keys than N
    full = torch.ones(b, hq, q, n, dtype=torch.bool) if mask is None else mask.expand(b, hq, q, n).clone()
    if case.causal:
        full &= torch.arange(n)[None, :] <= torch.arange(q)[:, None] + (n - q)
    num_kept = full.sum(-1).clamp(max=case.top_n).to(torch.int32)
    dtype = case.dtype
    return query.to(dtype), key.to(dtype), value.to(dtype), mask, full, num_kept


# output tolerance per value dtype (values and weights rounded to it in the kernel's product)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
