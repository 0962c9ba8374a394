"""Tile helpers shared by the two prefill kernels: score tiles (fp16 or int8 dots, or XOR/popcount of sign words),
validity of a tile's (row, key) pairs, query operands and the key range of a row block."""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import _popcount

SCORE_MODES = {"dot16": 0, "dot8": 1, "popcount": 2}
# counting rounds of a row block: the interval of levels shrinks at every round that leaves a row unresolved (about
# 5x, and one round resolves 4 levels), so 129 levels need at most 5; the cap only guards against a bug looping
MAX_ROUNDS = 16


@triton.jit
def _score_tile(q_op, qw0, qw1, k_base, start, offs_n0, offs_d, n_keys, stride_kn, stride_kd,
                D: tl.constexpr, W: tl.constexpr, MODE: tl.constexpr, USE_POPC: tl.constexpr,
                BOUNDS: tl.constexpr, HALF: tl.constexpr = False):  # fmt: skip
    """(BLOCK_M, BLOCK_N) binary scores of the program's rows against the keys start .. start + BLOCK_N - 1: fp32
    from a ±1 fp16 dot (MODE 0; converted to fp16 with HALF, exact as |Sb| <= 128), int32 from a ±1 int8 dot (MODE
    1) or from XOR/popcount of sign words (MODE 2). BOUNDS: the tile may reach past n_keys (those keys' scores are
    garbage: the caller masks them)."""
    offs_n = start + offs_n0
    if MODE == 2:
        k_at = k_base + offs_n.to(tl.int64) * stride_kn
        if BOUNDS:
            k0 = tl.load(k_at, mask=offs_n < n_keys, other=0)
        else:
            k0 = tl.load(k_at)
        dist = _popcount(qw0 ^ k0[None, :], USE_POPC)
        if W > 1:
            if BOUNDS:
                k1 = tl.load(k_at + stride_kd, mask=offs_n < n_keys, other=0)
            else:
                k1 = tl.load(k_at + stride_kd)
            dist += _popcount(qw1 ^ k1[None, :], USE_POPC)
        s = D - 2 * dist
    else:
        k_at = k_base + offs_d[:, None] * stride_kd + offs_n.to(tl.int64)[None, :] * stride_kn
        if BOUNDS:
            kt = tl.load(k_at, mask=(offs_n < n_keys)[None, :], other=0)
        else:
            kt = tl.load(k_at)
        s = tl.dot(q_op, kt)
        if HALF:
            # converted after the product: ptxas waits after each wgmma of an fp16 accumulator, not of an fp32 one
            s = s.to(tl.float16)
    return s


@triton.jit
def _tile_valid(offs_m, offs_n, row_ok, limit, n_keys, m_base, stride_mi, stride_mn,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_ROWS: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_N) keys a row may attend: in range and not in its causal future (MASKED tiles only: the
    others are known to be whole and in everybody's past), and allowed by the padding mask (HAS_MASK)."""
    valid = (offs_n < n_keys)[None, :] & row_ok[:, None]
    if MASKED and CAUSAL:
        valid = valid & (offs_n[None, :] <= limit[:, None])
    if HAS_MASK:
        if MASK_ROWS:
            at = m_base + offs_m.to(tl.int64)[:, None] * stride_mi + offs_n.to(tl.int64)[None, :] * stride_mn
            allowed = tl.load(at, mask=valid, other=0)
        else:
            allowed = tl.load(m_base + offs_n.to(tl.int64) * stride_mn, mask=offs_n < n_keys, other=0)[None, :]
        valid = valid & (allowed != 0)
    return valid


@triton.jit
def _query_operand(q_ptr, q_base, offs_m, row_ok, offs_d, stride_qi, stride_qd, MODE: tl.constexpr):
    """The rows' ±1 query signs as the left operand of the score dot (fp16, or int8 for MODE 1)."""
    q = tl.load(q_base + offs_m.to(tl.int64)[:, None] * stride_qi + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
    # (compared in fp32: the interpreter compares bf16 values by their bits)
    if MODE == 1:
        op = tl.where(q >= 0, 1, -1).to(tl.int8)
    else:
        op = tl.where(q >= 0, 1.0, -1.0).to(tl.float16)
    return op


@triton.jit
def _query_word(qw_ptr, qw_base, offs_m, row_ok, word, stride_qi, stride_qw):
    """(BLOCK_M, 1) packed sign word `word` of the rows' queries (MODE 2)."""
    w = tl.load(qw_base + offs_m.to(tl.int64) * stride_qi + word * stride_qw, mask=row_ok, other=0)
    return w[:, None]


@triton.jit
def _block_ranges(pid_m, q_len, n_keys, causal_off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr):  # fmt: skip
    """The keys of a row block: [0, full_end) whole tiles every row may attend (as far as causality and n go), and
    [full_end, kv_end) the tiles that need a mask."""
    if CAUSAL:
        first_row = pid_m * BLOCK_M
        last_row = tl.minimum(first_row + BLOCK_M, q_len) - 1
        kv_end = tl.maximum(tl.minimum(n_keys, last_row + causal_off + 1), 0)
        full_end = (tl.maximum(tl.minimum(n_keys, first_row + causal_off + 1), 0) // BLOCK_N) * BLOCK_N
    else:
        kv_end = n_keys
        full_end = (n_keys // BLOCK_N) * BLOCK_N
    return full_end, kv_end
