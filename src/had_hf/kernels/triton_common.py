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


def sink_args(
    sink_keys: int,
    valid_mask: torch.Tensor | None,
    rows: tuple[int, int, int],
    placeholder: torch.Tensor,
    scan: bool = False,
):
    """The kernels' attention-sink arguments `(sink_ends, sink_keys, SINKS)` for `sink_keys` sinks per row
    (`HADConfig.sink_keys`) over the (B, Hq, q) rows `rows`. SINKS 0: no sinks (`placeholder`, never read). SINKS 1:
    no padding mask, so every row's sinks are keys 0 .. sink_keys - 1 (those of them it may attend). SINKS 2: each
    row's end from `valid_mask` by `had_hf.selection.sink_ends`, as a contiguous (B, Hq, q) int32 tensor, which the
    kernels index by their global row (b * Hq + h) * q + i. SINKS 3 (`scan`, for kernels that read each row's valid
    flags themselves): each kernel finds its rows' ends with `_scanned_sink_ends`, so that a call with a mask
    launches no work before its kernels. The causal limit needs no mask here: it cuts a row's valid keys at its end,
    never before its first ones."""
    if not sink_keys:
        return placeholder, 0, 0
    if valid_mask is None:
        return placeholder, sink_keys, 1
    if scan:
        return placeholder, sink_keys, 3
    mask = valid_mask.reshape((1,) * (4 - valid_mask.dim()) + tuple(valid_mask.shape))
    # counted at the mask's own size (heads or rows it broadcasts over are counted once), in chunks of rows
    rows_per_chunk = max(1, 2**24 // max(1, mask.shape[-1] * mask.shape[0] * mask.shape[1]))
    ends = torch.cat([sink_ends(part, sink_keys) for part in mask.split(rows_per_chunk, dim=-2)], dim=-1)
    return ends.expand(rows).contiguous(), sink_keys, 2


@triton.jit
def _row_sink_ends(sink_ptr, grow, row_ok, sink_keys, SINKS: tl.constexpr):
    """Where the attention sinks of a program's rows (global indices `grow`) end, as `sink_args` describes them
    (SINKS 1 and 2): a key before its row's end is kept whatever its score, if the row may attend it. 0 for absent
    rows."""
    if SINKS == 2:
        ends = tl.load(sink_ptr + grow, mask=row_ok, other=0)
    else:
        ends = tl.where(row_ok, sink_keys, 0)
    return ends


# keys per block of `_scanned_sink_ends`: one block for rows that start valid
SINK_SCAN_N = tl.constexpr(64)


@triton.jit
def _scanned_sink_ends(row_ptrs, row_ok, n_keys, stride_n, sink_keys, INVALID: tl.constexpr, SCAN_N: tl.constexpr):
    """SINKS 3: each row's sink end, read from its valid flags: one byte per key at `row_ptrs + j * stride_n`, valid
    where it is not INVALID (a mask's bytes: 0; the distance codes: INVALID_CODE). Blocks of SCAN_N keys are read
    from key 0 until every row has seen `sink_keys` valid keys (one block where the rows start valid) or the keys
    end. The end counts the keys whose running count of valid keys is at most `sink_keys` (as
    `selection.sink_ends`, up to invalid keys past the last sink, which no row keeps); 0 for absent rows."""
    offs = tl.arange(0, SCAN_N)
    seen = tl.where(row_ok, 0, sink_keys)  # absent rows count as done
    ends = seen * 0
    start = n_keys * 0
    while (start < n_keys) & (tl.min(seen, axis=0) < sink_keys):
        keys = start + offs
        inside = row_ok[:, None] & (keys[None, :] < n_keys)
        flags = tl.load(row_ptrs[:, None] + keys[None, :] * stride_n, mask=inside, other=INVALID)
        valid = (flags != INVALID).to(tl.int32)
        running = tl.cumsum(valid, axis=1) + seen[:, None]
        ends += tl.sum(((running <= sink_keys) & inside).to(tl.int32), axis=1)
        seen += tl.sum(valid, axis=1)
        start += SCAN_N
    return tl.where(row_ok, ends, 0)


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
