"""Host side of the decode kernels: launch settings, scratch memory and per-kernel launch options."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .decode_split_k import MAX_ITERATIONS
from .triton_common import _cdiv, _float64_bits, _next_power_of_2


def _splits(n_keys: int, num_splits: int) -> tuple[int, int]:
    """At most `num_splits` splits of whole 64-key blocks over n keys: their number and length."""
    split_len = _cdiv(_cdiv(n_keys, num_splits), 64) * 64
    return _cdiv(n_keys, split_len), split_len


# The last program of a row block reduces the splits' results a tile of splits at a time, in registers: the tile being
# added, the next one (loaded one iteration ahead) and their running sum hold at most this many values per thread each.
_TILE_VALUES_PER_THREAD = 32


def _split_tile_size(num_splits: int, split_block: int, per_split: int, num_warps: int | None) -> int:
    """Splits per tile of a last-program reduction whose splits wrote `per_split` values each (a power of two)."""
    budget = _TILE_VALUES_PER_THREAD * 32 * (num_warps or 4)  # Triton's default: 4 warps
    fits = max(1, budget // per_split)
    return min(split_block, _next_power_of_2(num_splits), 1 << (fits.bit_length() - 1))


def _as_int64_words(words: torch.Tensor) -> torch.Tensor:
    """(..., W) int32 words as (..., W // 2) int64 words (two dimensions' words per int64, little-endian), a view
    where the layout allows it (a packed key cache's is), a copy otherwise."""
    try:
        return words.view(torch.int64)
    except RuntimeError:  # an odd stride or offset in int32 units
        return words.clone(memory_format=torch.contiguous_format).view(torch.int64)


def _kept_count_args(top_n: int | None, top_n_ratio: float | None, n_keys: int) -> tuple[int, int]:
    """The decode kernels' `top_n` and `top_n_ratio_bits` arguments, from which each program finds its rows' N
    (`decode_split_k._kept_count`): one of them is used, the other 0."""
    if top_n_ratio is not None:
        return 0, _float64_bits(float(top_n_ratio))
    return min(top_n, n_keys), 0


def _mask_args(valid_mask: torch.Tensor | None, shape: tuple, placeholder: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The decode kernels' mask argument and its four strides: the bool mask broadcast to `shape` (B, Hq, q, n) and
    viewed as bytes (broadcast dimensions at stride 0), or, without a mask, `placeholder` (never read) at stride 0."""
    if valid_mask is None:
        return placeholder, (0, 0, 0, 0)
    mask = valid_mask.expand(*shape).view(torch.uint8)
    return mask, mask.stride()


def _key_word_args(key_words: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """The keys' int32 sign words as the decode kernels read them, and the bits of a word: from d = 64 on, int64 words
    (one load per key at d = 64, contiguous over the keys), below it the int32 words."""
    if dim >= 64:
        return _as_int64_words(key_words), 64
    return key_words, 32


def _alpha_args(alpha: float) -> tuple[float, int]:
    """The decode kernels' scale arguments: 2 alpha log2(e) (the softmax weights are exp2 of it times a distance
    difference) and whether alpha >= 0 (which end of the distances is kept)."""
    return 2.0 * float(alpha) * math.log2(math.e), int(alpha >= 0)


class _Workspace:
    """Scratch memory of the decode kernels, kept per (device, stream) and grown as needed.

    Allocating a dozen small tensors per call costs more CPU time than a decode step's kernels take on the GPU. The
    tickets of the last-program reductions must start at zero: the kernels reset them after use.
    """

    _instances: dict[tuple, _Workspace] = {}

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}
        self.layouts: dict[tuple, tuple] = {}

    @classmethod
    def get(cls, device: torch.device) -> _Workspace:
        if device.type == "cuda" and (
            torch.cuda.is_current_stream_capturing()
            or torch.cuda.current_stream(device) != torch.cuda.default_stream(device)
        ):
            # CUDA graphs (recorded, and warmed up by torch.compile's CUDA-graph trees) run on a side stream and own
            # their memory: scratch allocated there lives in the graph's pool, and a cached buffer would outlive the
            # recording (CUDA-graph trees refuse untracked live allocations). Off the default stream: no cache.
            return cls(device)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (device.type, device.index, stream)
        if key not in cls._instances:
            cls._instances[key] = cls(device)
        return cls._instances[key]

    def take(self, name: str, numel: int, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            size = max(numel, int(numel * 1.25))
            buffer = (torch.zeros if zero else torch.empty)(size, dtype=dtype, device=self.device)
            self.buffers[name] = buffer
            self.layouts.clear()  # their views hold the old buffers
        return buffer

    def layout(self, key: tuple, build) -> tuple:
        """The views of one call layout, built once: a generation keeps its layout (which changes with the number
        of splits, the split length and the codes' row stride) for many steps, and a dozen slices cost ~40 us."""
        views = self.layouts.get(key)
        if views is None:
            views = self.layouts[key] = build()
        return views


@functools.lru_cache(maxsize=256)
def _launch_plan(
    distance_splits, num_splits, attend_splits, split_block, r_block, fine, value_dim, warps, stages, registers
) -> tuple:
    """Per kernel (distance, fine count, attend): the split-tile size of its last-program reduction, and its launch
    options (shared dicts: not to be modified). `warps`, `stages` and `registers` (the most registers per thread)
    hold one entry per kernel (`None`: Triton's default)."""
    s_blocks = tuple(
        _split_tile_size(splits, split_block, r_block * per_split, kernel_warps)
        for splits, per_split, kernel_warps in zip(
            (distance_splits, num_splits, attend_splits), (16, fine, value_dim), warps, strict=True
        )
    )
    options = []
    for kernel_warps, kernel_stages, kernel_registers in zip(warps, stages, registers, strict=True):
        option = {} if kernel_warps is None else {"num_warps": kernel_warps}
        if kernel_stages is not None:
            option["num_stages"] = kernel_stages
        if kernel_registers is not None:
            option["maxnreg"] = kernel_registers
        options.append(option)
    return s_blocks, tuple(options)


@dataclass(frozen=True)
class DecodeLaunch:
    """The launch settings of one decode call: rows per program, key splits and tile sizes."""

    r_block: int  # query rows per program (a power of two, at most 16)
    num_row_blocks: int
    num_splits: int  # key splits of the fine-count and attend kernels
    split_len: int
    distance_splits: int  # key splits of the distance kernel (at most num_splits)
    distance_split_len: int
    distance_block_n: int  # keys per iteration of the distance kernel
    count_block_n: int  # keys per iteration of the fine count
    select_block_n: int  # keys per iteration of the attend kernel's selection


def decode_launch(
    n_keys: int,
    rows_per_group: int,
    kv_groups: int,
    multiprocessors: int,
    *,
    num_splits: int | None = None,
    programs_per_sm: int | None = None,
    distance_programs_per_sm: int | None = None,
    distance_splits: int | None = None,
    block_n: int | None = None,
    hist_block_elements: int = 1024,
    sinks: bool = False,
) -> DecodeLaunch:
    """The launch settings of a decode call from its shape, by a heuristic; each keyword overrides one choice (the
    benchmark sweeps of `benchmarks/decode.py` and the tests set them).

    Args:
        n_keys (`int`): keys per row.
        rows_per_group (`int`): query rows per kv head (query heads of the group times query positions).
        kv_groups (`int`): batch times kv heads.
        multiprocessors (`int`): multiprocessors of the GPU (1 in the interpreter).
        num_splits, programs_per_sm, distance_programs_per_sm, distance_splits, block_n, hist_block_elements:
            see `hamming_topk_decode`.
        sinks (`bool`, *optional*, defaults to `False`): whether the call keeps attention sinks (`sink_keys` > 0).
    """
    r_block = min(16, _next_power_of_2(rows_per_group))
    num_row_blocks = _cdiv(rows_per_group, r_block)
    groups = kv_groups * num_row_blocks
    count_block_n = max(16, min(1024, hist_block_elements // r_block))
    # keys per selection tile: 1024 for one or two rows ((128, 8) tiles); 512 for four (fewer registers, so that more
    # attend programs fit a multiprocessor: benchmarks/README.md, "The grouped-query attend kernel"), but 1024 with
    # sinks (at 512 their attend kernel spills at d = 128 on sm_90); 8192 (row, key) pairs for more
    if block_n:
        select_block_n = block_n
    elif r_block == 4:
        select_block_n = 1024 if sinks else 512
    else:
        select_block_n = 1024 if r_block <= 2 else max(64, 8192 // r_block)
    num_splits_given = num_splits is not None
    if num_splits is None:
        if programs_per_sm is None:
            programs_per_sm = 8 if r_block == 1 else 4
        # rounded down: a last, mostly idle wave of programs would cost a whole wave's time
        num_splits = max(1, programs_per_sm * multiprocessors // groups)
    # whole 64-key blocks, and at most MAX_ITERATIONS counting blocks per split (the packed 7-bit counters)
    # (a margin: the split length is rounded up to 64 keys, and the distance kernel adds tail blocks over <= 64 keys)
    fewest_splits = _cdiv(n_keys, (MAX_ITERATIONS - 2 - 64 // count_block_n) * count_block_n)
    num_splits, split_len = _splits(n_keys, max(num_splits, fewest_splits))
    if distance_splits is None:
        # the distance kernel shares the splits unless its own programs per multiprocessor are asked for
        chosen = num_splits_given or distance_programs_per_sm is None
        distance_splits = num_splits if chosen else max(1, distance_programs_per_sm * multiprocessors // groups)
    distance_splits, distance_split_len = _splits(n_keys, min(num_splits, max(distance_splits, fewest_splits)))
    return DecodeLaunch(
        r_block=r_block,
        num_row_blocks=num_row_blocks,
        num_splits=num_splits,
        split_len=split_len,
        distance_splits=distance_splits,
        distance_split_len=distance_split_len,
        distance_block_n=min(count_block_n, _next_power_of_2(distance_split_len)),
        count_block_n=min(count_block_n, _next_power_of_2(split_len)),
        select_block_n=select_block_n,
    )


# The short-context kernel (`decode_short_kernel`): one program per (batch, kv head, row block) over all keys. Inside
# each program its time grows with n: three passes over the packed keys (the first from memory, the next two from
# L1/L2), then the gather of a row's ~0.117 n value rows. The three-kernel path pays three launches and two
# last-program reductions whatever n (a few us each), but spreads long rows over every multiprocessor. So the short
# kernel serves calls up to n x dv = 2^19 (8,192 keys at dv = 64, 4,096 at dv = 128), where it is faster or level
# with the three kernels (`benchmarks/results/decode_short*.json`), and the three kernels serve longer rows.
SHORT_MAX_KEY_VALUES = 1 << 19
SHORT_BY_DEFAULT = True
# distances fit a byte code (0..d, 255 = masked) and the query in two 64-bit words up to d = 128
SHORT_MAX_HEAD_DIM = 128
# Rows of all programs together up to which each program takes one row (the most programs, each with the least work);
# beyond, rows of a kv head share programs (their key passes and value rows loaded once).
_SHORT_ROWS_PER_SM = 2
# One program gathers all of its rows' value rows, GATHER_BLOCK at a time: GATHER_STAGES = 0 issues the next tile's
# loads by hand one iteration ahead (as the three-kernel path does), > 0 leaves it to Triton's pipeliner
SHORT_GATHER_BLOCK = 64
SHORT_GATHER_STAGES = 0


# The options of `hamming_topk_decode` that belong to one path, with their defaults: any other value asks for that path.
SPLIT_K_OPTIONS = {
    "num_splits": None,
    "programs_per_sm": None,
    "distance_programs_per_sm": None,
    "distance_splits": None,
    "num_warps": None,
    "num_stages": None,
    "max_registers": None,
    "split_block": 32,
    "attend_split_group": 1,
    "interleave_gather": False,
    "single_row_dot": False,
}
SHORT_OPTIONS = {"short_row_block": None, "short_num_warps": None}


def short_kernel_wanted(options: dict, n_keys: int, head_dim: int, value_dim: int) -> bool:
    """Whether a decode call runs the short-context kernel, from its keyword options (`hamming_topk_decode`'s; those
    left out at their defaults): `short_kernel` if given, else the three-kernel path when one of its options is given,
    the short kernel when one of its own is, and otherwise, with SHORT_BY_DEFAULT, short contexts (n x dv <=
    SHORT_MAX_KEY_VALUES) of head dims the kernel takes."""
    split_options = [name for name, default in SPLIT_K_OPTIONS.items() if options.get(name, default) != default]
    short_options = [name for name, default in SHORT_OPTIONS.items() if options.get(name, default) != default]
    short_kernel = options.get("short_kernel")
    if split_options and short_options:
        raise ValueError(
            f"Options of the three-kernel path ({split_options}) and of the short kernel ({short_options}) cannot be "
            "combined."
        )
    fits = head_dim <= SHORT_MAX_HEAD_DIM
    if short_kernel is None:
        if split_options or not short_options:
            return SHORT_BY_DEFAULT and not split_options and fits and n_keys * value_dim <= SHORT_MAX_KEY_VALUES
        short_kernel = True  # its own options ask for it
    elif short_kernel and split_options:
        raise ValueError(f"short_kernel=True takes none of the three-kernel path's options, got {split_options}.")
    elif not short_kernel and short_options:
        raise ValueError(f"short_kernel=False takes none of the short kernel's options, got {short_options}.")
    if short_kernel and not fits:
        raise ValueError(f"The short decode kernel takes head dims up to {SHORT_MAX_HEAD_DIM}, got {head_dim}.")
    return short_kernel


@dataclass(frozen=True)
class ShortLaunch:
    """The launch settings of the short-context kernel: rows per program and tile sizes."""

    r_block: int  # query rows per program: 1, 2 or 4
    num_row_blocks: int
    count_block_n: int  # keys per iteration of the two counting passes
    select_block_n: int  # keys per iteration of the selection


def short_decode_launch(
    n_keys: int,
    rows_per_group: int,
    kv_groups: int,
    multiprocessors: int,
    *,
    row_block: int | None = None,
    block_n: int | None = None,
    hist_block_elements: int = 1024,
) -> ShortLaunch:
    """The short kernel's launch settings from the shape; `row_block` (1, 2 or 4), `block_n` and `hist_block_elements`
    (see `hamming_topk_decode`) override the choices."""
    most = min(4, _next_power_of_2(rows_per_group))
    if row_block is None:
        row_block = 1
        while row_block < most and kv_groups * _cdiv(rows_per_group, row_block) > _SHORT_ROWS_PER_SM * multiprocessors:
            row_block *= 2
    elif row_block not in (1, 2, 4):
        raise ValueError(f"short_row_block must be 1, 2 or 4 (query rows per program), got {row_block}.")
    r_block = min(row_block, most)
    keys = max(16, _next_power_of_2(n_keys))
    return ShortLaunch(
        r_block=r_block,
        num_row_blocks=_cdiv(rows_per_group, r_block),
        count_block_n=min(keys, max(16, hist_block_elements // r_block)),
        select_block_n=min(keys, block_n or 1024),
    )
