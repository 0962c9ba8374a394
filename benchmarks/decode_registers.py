"""Registers, spills and shared memory of the decode kernels (the three of the split-K path, or the short-context
kernel) as launched at the benchmark shapes, compiled for sm_90 (H100/H200) on a machine without a GPU, and how many
programs fit on a multiprocessor at once.

    PYTHONPATH=src python benchmarks/decode_registers.py --out benchmarks/results/decode_registers.json

A kernel of r registers per thread (rounded up to 8) and w warps fits 65536 // (32 w r) programs on a multiprocessor
(fewer if its shared memory does not fit); a launch of more programs than 132 multiprocessors hold runs in several
waves. `hamming_topk_decode` runs on meta tensors with its launches recorded instead of run (the host side exactly as
on the GPU, the split count or the short kernel's rows per program of 132 multiprocessors given explicitly), then each recorded launch is compiled with
`triton.compile` for `GPUTarget("cuda", 90, 32)` with the specialization the GPU's launch would have (16-byte
aligned pointers, integers divisible by 16, ones as constants, libdevice popcount), and `cuobjdump -res-usage` reads
the binary. Registers differ between Triton versions: run it under the GPU machine's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import triton  # noqa: E402
from decode import SHAPES  # noqa: E402
from decode_variants import SHAPE_VARIANTS, SHORT_SHAPES, VARIANTS  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from had_hf.kernels import decode_short_kernel, decode_split, triton_decode  # noqa: E402
from had_hf.kernels.decode_launch import decode_launch, short_decode_launch, short_kernel_wanted  # noqa: E402

MULTIPROCESSORS = 132  # H100 SXM / H200
REGISTERS_PER_MULTIPROCESSOR = 65536
SHARED_PER_MULTIPROCESSOR = 228 * 1024
POINTER_TYPES = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.uint8: "*u8",
    torch.int8: "*i8",
    torch.int16: "*i16",
    torch.int32: "*i32",
    torch.int64: "*i64",
}
KERNELS = (
    decode_split._distance_kernel,
    decode_split._fine_count_kernel,
    decode_split._attend_kernel,
    decode_short_kernel._short_decode_kernel,
)


def record_launches(shape, options: dict) -> list[tuple]:
    """The (kernel, grid, arguments, keyword arguments) of each launch of one decode call at `shape`."""
    launches = []
    saved = {kernel: kernel.__dict__.get("run") for kernel in KERNELS}

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append((kernel, grid, args, kwargs))

        return run

    meta = torch.device("meta")
    b, hq, hkv, d, n = shape.batch, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.num_keys
    query = torch.empty(b, hq, 1, d, dtype=torch.bfloat16, device=meta)
    key_words = torch.empty(b, hkv, n, d // 32, dtype=torch.int32, device=meta)
    value = torch.empty(b, hkv, n, d, dtype=torch.bfloat16, device=meta)
    # the split count, or the short kernel's rows per program, of the GPU's launch (on meta tensors the host would plan
    # for one multiprocessor)
    call_options = {key: value for key, value in options.items() if key != "programs_per_sm"}
    if short_kernel_wanted(options, n, d, d):
        rows = short_decode_launch(n, hq // hkv, b * hkv, MULTIPROCESSORS).r_block
        call_options = {"short_kernel": True, "short_row_block": rows} | call_options
    else:
        planned = {key: options[key] for key in ("programs_per_sm", "block_n") if key in options}
        call_options["num_splits"] = decode_launch(n, hq // hkv, b * hkv, MULTIPROCESSORS, **planned).num_splits
    try:
        for kernel in KERNELS:
            kernel.run = recorder(kernel)
        triton_decode.hamming_topk_decode(query, key_words, value, None, shape.top_n, 1 / math.sqrt(d), **call_options)
    finally:
        for kernel, run in saved.items():
            if run is None:
                del kernel.run
            else:
                kernel.run = run
    return launches


def compile_launch(kernel, args: tuple, kwargs: dict) -> dict:
    """Compiles one recorded launch for sm_90 and reads its registers, stack and shared memory."""
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "maxnreg") if key in kwargs}
    options.setdefault("num_warps", 4)
    if "USE_POPC" in kwargs:
        kwargs["USE_POPC"] = True  # libdevice's popcount, as on the GPU (meta tensors are not CUDA tensors)
    values = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
    signature, constants, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        name, value = param.name, values[param.name]
        fixed = param.do_not_specialize
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1 and not fixed):
            signature[name], constants[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name], attrs[(index,)] = POINTER_TYPES[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not fixed:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    binary = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as cubin:
        cubin.write(binary.asm["cubin"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", cubin.name], capture_output=True, text=True)
    os.unlink(cubin.name)
    registers = int(re.search(r"REG:(\d+)", usage.stdout).group(1))
    warps = options["num_warps"]
    shared = binary.metadata.shared
    fits = min(
        REGISTERS_PER_MULTIPROCESSOR // (32 * warps * (-(-registers // 8) * 8)),
        SHARED_PER_MULTIPROCESSOR // shared if shared else 32,
        64 // warps,
    )
    return dict(
        registers=registers,
        stack=int(re.search(r"STACK:(\d+)", usage.stdout).group(1)),
        shared=shared,
        num_warps=warps,
        programs_per_multiprocessor=fits,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_registers.json")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPE_VARIANTS), help="names of the shapes")
    parser.add_argument("--variants", nargs="*", help="names of decode_variants.py's variants (default: each shape's)")
    args = parser.parse_args(argv)
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "target": "sm_90, 132 multiprocessors",
        "shapes": [],
    }
    by_name = {shape.name: shape for shape in [*SHAPES, *SHORT_SHAPES]}
    for shape_name in args.shapes:
        shape = by_name[shape_name]
        rows = []
        for variant in args.variants or SHAPE_VARIANTS[shape_name]:
            row: dict = {"variant": variant, "options": VARIANTS[variant], "kernels": {}}
            for kernel, grid, launch_args, kwargs in record_launches(shape, VARIANTS[variant]):
                name = kernel.fn.__name__
                try:
                    info = compile_launch(kernel, launch_args, dict(kwargs))
                    programs = math.prod(grid)
                    info.update(programs=programs)
                    info["waves"] = -(-programs // (info["programs_per_multiprocessor"] * MULTIPROCESSORS))
                except Exception as error:  # a variant this Triton cannot compile is reported, not fatal
                    info = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                row["kernels"][name] = info
                print(shape_name, variant, name, info, flush=True)
            rows.append(row)
        report["shapes"].append({"shape": shape_name, "variants": rows})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
