"""What the Triton kernels share: the interpreter switch, the launch device, popcount, attention sinks and host
number helpers."""

from __future__ import annotations

import contextlib
import functools
import os
import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..selection import sink_ends


@functools.cache
def _interpreting() -> bool:
    # Triton reads the variable once, when it is imported; so do we (an environment lookup per call costs ~5 us)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _on_device(device: torch.device):
    """The context of a launch on `device`: Triton launches on the current CUDA device and its current stream, so
    tensors on another GPU (a model split over GPUs) need their device made current. A no-op when it already is, and
    on the CPU (the interpreter)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@triton.jit
def _popcount(x, USE_POPC: tl.constexpr):
    """Set bits of each int32 or int64 word (libdevice on the GPU; SWAR bit arithmetic in the interpreter)."""
    if USE_POPC:
        return libdevice.popc(x)  # __nv_popc, or __nv_popcll for int64 words
    elif x.dtype == tl.int64:
        return _popcount((x & 0xFFFFFFFF).to(tl.int32), False) + _popcount((x >> 32).to(tl.int32), False)
    else:
        u = x.to(tl.uint32, bitcast=True)
        u = u - ((u >> 1) & 0x55555555)
        u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
        u = (u + (u >> 4)) & 0x0F0F0F0F
        u = (u * 0x01010101) >> 24
        return u.to(tl.int32)


def sink_args(sink_keys: int, valid_mask: torch.Tensor | None, rows: tuple[int, int, int], placeholder: torch.Tensor):
    """The kernels' attention-sink arguments `(sink_ends, sink_keys, SINKS)` for `sink_keys` sinks per row
    (`HADConfig.sink_keys`) over the (B, Hq, q) rows `rows`. SINKS 0: no sinks (`placeholder`, never read). SINKS 1:
    no padding mask, so every row's sinks are keys 0 .. sink_keys - 1 (those of them it may attend). SINKS 2: each
    row's end from `valid_mask` by `had_hf.selection.sink_ends`, as a contiguous (B, Hq, q) int32 tensor, which the
    kernels index by their global row (b * Hq + h) * q + i. The causal limit needs no mask here: it cuts a row's
    valid keys at its end, never before its first ones."""
    if not sink_keys:
        return placeholder, 0, 0
    if valid_mask is None:
        return placeholder, sink_keys, 1
    mask = valid_mask.reshape((1,) * (4 - valid_mask.dim()) + tuple(valid_mask.shape))
    # counted at the mask's own size (heads or rows it broadcasts over are counted once), in chunks of rows
    rows_per_chunk = max(1, 2**24 // max(1, mask.shape[-1] * mask.shape[0] * mask.shape[1]))
    ends = torch.cat([sink_ends(part, sink_keys) for part in mask.split(rows_per_chunk, dim=-2)], dim=-1)
    return ends.expand(rows).contiguous(), sink_keys, 2


@triton.jit
def _row_sink_ends(sink_ptr, grow, row_ok, sink_keys, SINKS: tl.constexpr):
    """Where the attention sinks of a program's rows (global indices `grow`) end, as `sink_args` describes them:
    a key before its row's end is kept whatever its score, if the row may attend it. 0 for absent rows."""
    if SINKS == 2:
        ends = tl.load(sink_ptr + grow, mask=row_ok, other=0)
    else:
        ends = tl.where(row_ok, sink_keys, 0)
    return ends


# Host-side integer helpers: `triton.cdiv` and `triton.next_power_of_2` are constexpr functions in recent Triton,
# whose host calls are slow (see benchmarks/README.md, decode kernel design notes).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _float64_bits(x: float) -> int:
    """The bits of `x` as a float64, as a signed int64 value: how a kernel takes a float it must use in float64 (Triton
    passes Python floats as float32; the kernel bit-casts the int64 back)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _next_power_of_2(x: int) -> int:
    return 1 << (x - 1).bit_length() if x > 1 else 1


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0
