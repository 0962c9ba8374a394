"""Compiles the decode kernels' in-kernel sink scan (`triton_common._scanned_sink_ends`) for sm_90 through Triton's
CUDA backend, which runs without a GPU; prints whether a cubin came out. Run by `test_kernels.py` in a process of its
own (TRITON_INTERPRET unset: an interpreting Triton does not compile)."""

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from had_hf.kernels.triton_common import SINK_SCAN_N, _scanned_sink_ends


@triton.jit
def probe(flags_ptr, out_ptr, n_keys, stride_r, stride_n, sink_keys, R: tl.constexpr):
    rows = tl.arange(0, R)
    ends = _scanned_sink_ends(flags_ptr + rows.to(tl.int64) * stride_r, rows < 3, n_keys, stride_n, sink_keys, 255,
                              SINK_SCAN_N)  # fmt: skip
    tl.store(out_ptr + rows, ends)


if __name__ == "__main__":
    signature = {"flags_ptr": "*u8", "out_ptr": "*i32", "n_keys": "i32", "stride_r": "i32", "stride_n": "i32",
                 "sink_keys": "i32", "R": "constexpr"}  # fmt: skip
    compiled = triton.compile(ASTSource(fn=probe, signature=signature, constexprs={"R": 4}),
                              target=GPUTarget("cuda", 90, 32))  # fmt: skip
    print("cubin" in compiled.asm)
