"""The host side of the split-K decode kernels (`decode_distance_kernel`, `decode_fine_count_kernel`,
`decode_attend_kernel`): their workspace layout, arguments and three launches, each program one (batch, kv head, row
block, split) as `decode_launch.decode_launch` plans."""

from __future__ import annotations

import torch

from .decode_attend_kernel import _attend_kernel
from .decode_distance_kernel import _distance_kernel
from .decode_fine_count_kernel import _fine_count_kernel
from .decode_launch import (
    DecodeLaunch,
    _alpha_args,
    _kept_count_args,
    _key_word_args,
    _launch_plan,
    _mask_args,
    _Workspace,
)
from .triton_common import _cdiv, _interpreting, _on_device, sink_args


def split_decode(
    query: torch.Tensor,
    key_words: torch.Tensor,
    value: torch.Tensor,
    valid_mask: torch.Tensor | None,
    top_n: int | None,
    top_n_ratio: float | None,
    alpha: float,
    settings: DecodeLaunch,
    warps: tuple,
    stages: tuple,
    registers: tuple,
    split_block: int,
    gather_block: int,
    gather_stages: int,
    attend_split_group: int,
    interleave_gather: bool,
    single_row_dot: bool,
    return_keep: bool,
    sink_keys: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launches the three split-K kernels (the arguments as `hamming_topk_decode` checked them, the per-kernel launch
    options as three entries each; int32 key words); returns the output and, if `return_keep`, the keep mask."""
    batch, num_heads, query_len, dim = query.shape
    _, num_kv_heads, n_keys, _ = key_words.shape
    value_dim = value.shape[-1]
    group = num_heads // num_kv_heads
    rows_per_group = group * query_len
    device = query.device
    ratio_rule = top_n_ratio is not None
    r_block, num_row_blocks = settings.r_block, settings.num_row_blocks
    num_splits, split_len = settings.num_splits, settings.split_len
    distance_splits, distance_split_len = settings.distance_splits, settings.distance_split_len
    num_rows = batch * num_kv_heads * rows_per_group
    groups = batch * num_kv_heads * num_row_blocks

    # one byte per (row, key) holds the distance for d <= 128 (0..d, and 255 = masked); d = 256 needs int16
    code_dtype, invalid_code = (torch.uint8, 255) if dim < 255 else (torch.int16, 32767)
    fine = dim // 8
    # the attend kernel's splits: attend_split_group splits of the fine count each
    attend_splits, attend_split_len = _cdiv(num_splits, attend_split_group), split_len * attend_split_group
    list_entries = groups * attend_splits * attend_split_len  # per attend program, room for a whole split
    work = _Workspace.get(device)
    code_stride = _cdiv(n_keys, 64) * 64

    def build_layout() -> tuple:
        codes = work.take("codes" + str(code_dtype), num_rows * code_stride, code_dtype)
        ints = work.take("int32", num_rows * (num_splits * (16 + fine + 2) + 8) + list_entries, torch.int32)
        split_rows = num_rows * num_splits
        # int32: coarse counts (16 per row and split), fine counts (fine), quotas (2), stats (8 per row), kept index
        ends = [split_rows * 16, split_rows * fine, split_rows * 2, num_rows * 8, list_entries]
        int_views = torch.split(ints[: sum(ends)], ends)
        floats = work.take("float32", split_rows * (value_dim + 1) + list_entries * r_block, torch.float32)
        # float32: denominators (1 per row and split), numerators (value_dim), kept weights (r_block per entry)
        float_views = torch.split(floats[: split_rows * (value_dim + 1) + list_entries * r_block],
                                  [split_rows, split_rows * value_dim, list_entries * r_block])  # fmt: skip
        tickets = work.take("tickets", 3 * groups, torch.int32, zero=True)
        return (codes, *int_views, *float_views, *torch.split(tickets[: 3 * groups], groups))

    layout_key = (num_rows, num_splits, split_len, code_stride, code_dtype, fine, value_dim, r_block, groups,
                  attend_split_group)  # fmt: skip
    (codes, coarse_counts, fine_counts, quotas, stats, kept_index, denominators, numerators, kept_weight,
     distance_tickets, count_tickets, attend_tickets) = work.layout(layout_key, build_layout)  # fmt: skip
    out = torch.empty(batch, num_heads, query_len, value_dim, dtype=value.dtype, device=device)
    keep_rows = torch.zeros(num_rows, code_stride, dtype=torch.int8, device=device) if return_keep else codes

    mask_arg, mask_strides = _mask_args(valid_mask, (batch, num_heads, query_len, n_keys), codes)
    sinks, sink_count, sink_mode = sink_args(sink_keys, valid_mask, (batch, num_heads, query_len), codes, scan=True)
    row_fma = r_block == 1 and not single_row_dot
    s_blocks, launch_options = _launch_plan(
        distance_splits, num_splits, attend_splits, split_block, r_block, fine, value_dim, warps, stages, registers
    )

    grid = (batch * num_kv_heads, num_row_blocks, num_splits)
    kernel_words, word_bits = _key_word_args(key_words, dim)
    with _on_device(device):
        _distance_kernel[(batch * num_kv_heads, num_row_blocks, distance_splits)](
            query,
            kernel_words,
            mask_arg,
            codes,
            coarse_counts,
            stats,
            distance_tickets,
            n_keys,
            code_stride,
            *_kept_count_args(top_n, top_n_ratio, n_keys),
            rows_per_group,
            query_len,
            group,
            num_kv_heads,
            distance_split_len,
            distance_splits,
            *query.stride(),
            *kernel_words.stride(),
            *mask_strides,
            D=dim,
            W=dim // word_bits,
            WORD_BITS=word_bits,
            R_BLOCK=r_block,
            BLOCK_N=settings.distance_block_n,
            HAS_MASK=valid_mask is not None,
            USE_POPC=query.is_cuda and not _interpreting(),
            INVALID_CODE=invalid_code,
            S_BLOCK=s_blocks[0],
            RATIO=ratio_rule,
            **launch_options[0],
        )
        _fine_count_kernel[grid](
            codes,
            fine_counts,
            stats,
            quotas,
            count_tickets,
            n_keys,
            code_stride,
            rows_per_group,
            split_len,
            num_splits,
            FINE=fine,
            R_BLOCK=r_block,
            BLOCK_N=settings.count_block_n,
            INVALID_CODE=invalid_code,
            S_BLOCK=s_blocks[1],
            **launch_options[1],
        )
        _attend_kernel[(batch * num_kv_heads, num_row_blocks, attend_splits)](
            codes,
            stats,
            quotas,
            value,
            kept_index,
            kept_weight,
            denominators,
            numerators,
            out,
            keep_rows,
            attend_tickets,
            sinks,
            n_keys,
            code_stride,
            rows_per_group,
            query_len,
            group,
            num_kv_heads,
            attend_split_len,
            attend_splits,
            num_splits,
            *_alpha_args(alpha),
            sink_count,
            *value.stride(),
            *out.stride(),
            DV=value_dim,
            R_BLOCK=r_block,
            R_DOT=1 if row_fma else max(16, r_block),
            BLOCK_N=settings.select_block_n,
            BLOCK_K=gather_block,
            INVALID_CODE=invalid_code,
            V_IS_FP32=value.dtype == torch.float32,
            # 16-bit values go through tensor cores; fp32 and fp64 values are accumulated in fp32 (tl.dot of fp64 gives
            # fp64, which the fp32 accumulator cannot take)
            DOT_FP32=value.dtype in (torch.float32, torch.float64) or _interpreting(),
            ROW_FMA=row_fma,
            WRITE_KEEP=return_keep,
            S_BLOCK=s_blocks[2],
            GATHER_STAGES=gather_stages,
            SPLIT_GROUP=attend_split_group,
            INTERLEAVE=interleave_gather,
            SINKS=sink_mode,
            **launch_options[2],
        )
    if return_keep:
        keep = keep_rows[:, :n_keys].reshape(batch, num_kv_heads, group, query_len, n_keys).bool()
        return out, keep.view(batch, num_heads, query_len, n_keys)
    return out, None
