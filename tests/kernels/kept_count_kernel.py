"""The decode kernels' copy of the N rule (`decode_split_k._kept_count`) run over a vector of valid-key counts, so that
the tests can hold it equal to `had_hf.selection.kept_counts` (the rule) on many counts at once.

Shared by `test_kernels.py` (GPU) and `interpret_triton_cases.py` (interpreter); not collected itself. Import it only
after `TRITON_INTERPRET` is set, where the interpreter is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from had_hf.kernels.decode_launch import _kept_count_args
from had_hf.kernels.decode_split_k import _kept_count

BLOCK = 1024


@triton.jit(do_not_specialize=("top_n", "top_n_ratio_bits"))
def _kept_count_kernel(counts_ptr, out_ptr, size, top_n, top_n_ratio_bits, RATIO: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < size
    counts = tl.load(counts_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, _kept_count(counts, top_n, top_n_ratio_bits, RATIO), mask=ok)


def kernel_kept_counts(counts: torch.Tensor, top_n: int | None, top_n_ratio: float | None) -> torch.Tensor:
    """N of each count in the 1-d int32 `counts`, as the decode kernels compute it (with the host's arguments)."""
    out = torch.empty_like(counts)
    top_n_arg, ratio_bits = _kept_count_args(top_n, top_n_ratio, int(counts.max()))
    _kept_count_kernel[(triton.cdiv(counts.numel(), BLOCK),)](
        counts, out, counts.numel(), top_n_arg, ratio_bits, RATIO=top_n_ratio is not None, BLOCK=BLOCK
    )
    return out
