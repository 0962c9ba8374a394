"""Compiles every Triton kernel that the decode and prefill calls launch, at the launch settings of real calls, for
sm_90 (H100 / H200) on a machine without a GPU, and prints one JSON line per compiled kernel.

A stub driver names the target, and Triton's JIT cache hook compiles each kernel at the signature and constants of
its launch (through Triton's CUDA backend and its bundled ptxas) and skips the launch, so the calls' outputs are
meaningless. Run by `test_kernels.py` in a process of its own, with TRITON_INTERPRET=0 (an interpreting Triton does
not compile), TRITON_DUMP_PTXAS_LOG=1 and a fresh TRITON_CACHE_DIR (so that ptxas runs and reports each kernel's
registers and spills). The stub replaces Triton's active driver. The GPU's popcount (`USE_POPC`) is switched on in
each compile, as the CPU tensors of the calls turn it off.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from had_hf.kernels import pack_signs
from had_hf.kernels.prefill_launch import default_prefill_config
from had_hf.kernels.triton_decode import hamming_topk_decode
from had_hf.kernels.triton_prefill import hamming_topk_prefill

TARGET = GPUTarget("cuda", 90, 32)


class StubDriver:
    """What `JITFunction.run` asks of the active driver before it compiles."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def compile_instead_of_launch(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
    """Compiles the launch's kernel for sm_90 with the GPU's popcount (`USE_POPC`, which CPU tensors turn off),
    prints its record with ptxas's register and spill counts, and skips the launch."""
    options = {name: compile[name] for name in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion",
                                                "launch_cooperative_grid", "extern_libs")}  # fmt: skip
    constants, names = dict(compile["constants"]), fn.jit_function.arg_names
    if "USE_POPC" in names:
        constants[(names.index("USE_POPC"),)] = True
    if "PACKED" in names and constants[(names.index("MODE"),)] == 0:
        constants[(names.index("PACKED"),)] = True
    source = triton.compiler.ASTSource(fn.jit_function, compile["signature"], constants, compile["configs"][0])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas -v, printed by Triton (TRITON_DUMP_PTXAS_LOG=1, cache off)
        kernel = triton.compile(source, target=TARGET, options=options)
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue())]
    if registers:
        PTXAS[kernel.hash] = (int(registers.group(1)), sum(spills))
    registers, spill_bytes = PTXAS.get(kernel.hash, (None, None))  # an identical kernel compiled earlier: cached
    record = {
        "call": CURRENT["call"],
        "kernel": fn.name,
        "cubin": "cubin" in kernel.asm,
        "shared": kernel.metadata.shared,
        "registers": registers,
        "spill_bytes": spill_bytes,
    }
    print(json.dumps(record), flush=True)
    return True  # compiled: skip the launch


CURRENT = {"call": ""}  # the call whose kernels are being compiled
PTXAS: dict[str, tuple[int, int]] = {}  # per compiled kernel's hash: ptxas's registers and spilled bytes


def calls():
    """(name, function): decode (short kernel and split-K; GQA; d 64 and 128; no mask, padding mask; attention sinks
    without and with a mask) and prefill (non-causal, causal GQA, padding mask, attention sinks)."""
    generator = torch.Generator().manual_seed(0)

    def tensors(batch, heads, kv_heads, q, n, d):
        query = torch.randn(batch, heads, q, d, generator=generator).to(torch.bfloat16)
        key = torch.randn(batch, kv_heads, n, d, generator=generator).to(torch.bfloat16)
        value = torch.randn(batch, kv_heads, n, d, generator=generator).to(torch.bfloat16)
        return query, key, value

    padding = torch.ones(2, 1, 1, 600, dtype=torch.bool)
    padding[1, ..., :100] = False
    for d in (64, 128):
        query, key, value = tensors(2, 8, 2, 1, 600, d)
        key_words = pack_signs(key)
        for short in (True, False):
            for sinks in (0, 1):
                for name, m in (("none", None), ("padding", padding)):
                    yield (f"decode {'short' if short else 'split-k'} d{d} mask {name} sinks {sinks}",
                           lambda q=query, k=key_words, v=value, m=m, s=sinks, short=short: hamming_topk_decode(
                               q, k, v, m, None, 0.3, top_n_ratio=0.117, sink_keys=s, short_kernel=short))  # fmt: skip
    for d, causal, heads, kv_heads in ((64, False, 4, 4), (128, True, 8, 2)):
        query, key, value = tensors(2, heads, kv_heads, 300, 300, d)
        mask = padding[..., :300]
        for sinks in (0, 2):
            for name, m in (("none", None), ("padding", mask)):
                # the GPU's launch settings (CPU tensors would get the interpreter's small tiles)
                config = default_prefill_config(d, d, 300, interpreting=False, value_dtype=value.dtype)
                yield (f"prefill d{d} causal {causal} mask {name} sinks {sinks}",
                       lambda q=query, k=key, v=value, m=m, c=causal, s=sinks, config=config: hamming_topk_prefill(
                           q, k, v, m, c, 36, 0.3, config=config, sink_keys=s))  # fmt: skip


if __name__ == "__main__":
    driver.set_active(StubDriver())
    knobs.runtime.jit_cache_hook = compile_instead_of_launch
    for name, call in calls():
        CURRENT["call"] = name
        call()
