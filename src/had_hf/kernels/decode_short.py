"""The host side of the short-context decode kernel (`decode_short_kernel`): its scratch lists from the workspace,
its arguments and its launch, one program per (batch, kv head, row block) as `decode_launch.short_decode_launch` plans."""

from __future__ import annotations

import torch

from .decode_launch import ShortLaunch, _alpha_args, _kept_count_args, _key_word_args, _mask_args, _Workspace
from .decode_short_kernel import _short_decode_kernel
from .decode_split_k import MAX_ITERATIONS
from .triton_common import _cdiv, _interpreting, _on_device, sink_args


def short_decode(
    query: torch.Tensor,
    key_words: torch.Tensor,
    value: torch.Tensor,
    valid_mask: torch.Tensor | None,
    top_n: int | None,
    top_n_ratio: float | None,
    alpha: float,
    launch: ShortLaunch,
    gather_block: int,
    gather_stages: int,
    num_warps: int | None,
    return_keep: bool,
    sink_keys: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launches the short-context kernel (the arguments as `hamming_topk_decode` checked them; int32 key words);
    returns the output and, if `return_keep`, the keep mask."""
    batch, num_heads, query_len, dim = query.shape
    _, num_kv_heads, n_keys, _ = key_words.shape
    value_dim = value.shape[-1]
    group = num_heads // num_kv_heads
    rows_per_group = group * query_len
    device = query.device
    r_block = launch.r_block
    programs = batch * num_kv_heads * launch.num_row_blocks
    list_stride = _cdiv(n_keys, 64) * 64
    work = _Workspace.get(device)
    list_index = work.take("short_index", programs * list_stride, torch.int32)
    # one row: the listed keys' codes (the gather computes the weights); several: the rows' weights of each
    if r_block == 1:
        list_code, list_weight = work.take("short_codes", programs * list_stride, torch.uint8), list_index
    else:
        list_code = list_index
        list_weight = work.take("short_weights", programs * list_stride * r_block, torch.float32)
    out = torch.empty(batch, num_heads, query_len, value_dim, dtype=value.dtype, device=device)
    num_rows = batch * num_kv_heads * rows_per_group
    keep_rows = torch.zeros(num_rows, n_keys, dtype=torch.int8, device=device) if return_keep else list_index
    mask_arg, mask_strides = _mask_args(valid_mask, (batch, num_heads, query_len, n_keys), list_index)
    sinks, sink_count, sink_mode = sink_args(
        sink_keys, valid_mask, (batch, num_heads, query_len), list_index, scan=True
    )
    kernel_words, word_bits = _key_word_args(key_words, dim)
    options = {} if num_warps is None else {"num_warps": num_warps}
    with _on_device(device):
        _short_decode_kernel[(batch * num_kv_heads, launch.num_row_blocks)](
            query,
            kernel_words,
            mask_arg,
            value,
            out,
            list_index,
            list_weight,
            list_code,
            keep_rows,
            sinks,
            n_keys,
            list_stride,
            *_kept_count_args(top_n, top_n_ratio, n_keys),
            rows_per_group,
            query_len,
            group,
            num_kv_heads,
            *_alpha_args(alpha),
            sink_count,
            *query.stride(),
            *kernel_words.stride(),
            *mask_strides,
            *value.stride(),
            *out.stride(),
            D=dim,
            W=dim // word_bits,
            WORD_BITS=word_bits,
            DV=value_dim,
            R_BLOCK=r_block,
            R_DOT=1 if r_block == 1 else 16,
            COUNT_N=launch.count_block_n,
            # counting tiles between two additions of the lanes' packed 7-bit coarse counters into int32 totals
            CHUNK_TILES=MAX_ITERATIONS,
            SELECT_N=launch.select_block_n,
            BLOCK_K=gather_block,
            HAS_MASK=valid_mask is not None,
            USE_POPC=query.is_cuda and not _interpreting(),
            INVALID_CODE=255,
            V_IS_FP32=value.dtype == torch.float32,
            # 16-bit values go through tensor cores; fp32 and fp64 values are accumulated in fp32
            DOT_FP32=value.dtype in (torch.float32, torch.float64) or _interpreting(),
            ROW_FMA=r_block == 1,
            WRITE_KEEP=return_keep,
            GATHER_STAGES=gather_stages,
            RATIO=top_n_ratio is not None,
            SINKS=sink_mode,
            **options,
        )
    if not return_keep:
        return out, None
    keep = keep_rows.reshape(batch, num_kv_heads, group, query_len, n_keys).bool()
    return out, keep.view(batch, num_heads, query_len, n_keys)
