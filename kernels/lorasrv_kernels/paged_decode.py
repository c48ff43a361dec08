"""Paged decode attention: one query token per row, GQA, K/V read through the block table.

Owns the split-KV decode kernel, its combine kernel and the typed launcher; reads no host copy
of lengths, so one launch configuration serves any context length (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_common import check_paged_args

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"

MAX_SPLITS = 16
# Enough programs to keep every SM streaming K/V: rows x kv heads x splits >= this.
_TARGET_PROGRAMS = 264  # 2 x 132 SMs (H100/H200)
_BLOCK_N = 64  # context tokens per inner iteration; pages are gathered per token
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    # pointers
    q_ptr,  # [num_rows, num_heads, head_dim]
    k_ptr,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_ptr,  # [num_pages, page_size, num_kv_heads, head_dim]
    tables_ptr,  # [num_rows, max_pages] int32
    kv_lens_ptr,  # [num_rows] int32, context tokens (the new one included)
    out_ptr,  # [num_rows, num_heads, head_dim], written when NUM_SPLITS == 1
    part_out_ptr,  # [num_rows, num_heads, NUM_SPLITS, HEAD_DIM] float32, split outputs
    part_lse_ptr,  # [num_rows, num_heads, NUM_SPLITS] float32, log2-sum-exp2 of each split
    # sizes
    qk_scale,  # softmax scale * log2(e)
    page_size,
    # strides
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_tr,
    stride_ot,
    stride_oh,
    # meta
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_G: tl.constexpr,  # >= max(16, GROUP), a power of two (tl.dot needs 16 rows)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    # NOTE: one program serves all GROUP query heads of one kv head, so each K/V byte of a
    # split is read once, not GROUP times.
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(kv_lens_ptr + row)
    # Splits cover whole BLOCK_N tiles; trailing splits of a short row are empty.
    per_split = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, kv_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # [BLOCK_G]
    q_ptrs = q_ptr + row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    # A finite floor instead of -inf keeps exp2 of fully masked tiles at 0, never NaN.
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = tables_ptr + row.to(tl.int64) * stride_tr
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n  # [BLOCK_N] context positions
        mask_n = pos < end
        page = tl.load(table_row + pos // page_size, mask=mask_n, other=0).to(tl.int64)
        in_page = (pos % page_size).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_ptrs = k_ptr + page[:, None] * stride_kp + in_page[:, None] * stride_ks
        k = tl.load(k_ptrs + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_N], log2 domain
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_ptr + page[:, None] * stride_vp + in_page[:, None] * stride_vs
        v = tl.load(v_ptrs + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    safe_l = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh
        o_mask = mask_g[:, None] & mask_d[None, :]
        tl.store(o_ptrs + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # Contiguous scratch: [row, head, split, d] and [row, head, split].
        num_heads = tl.num_programs(1) * GROUP
        head_base = (row.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_G]
        p_ptrs = part_out_ptr + head_base[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(p_ptrs, out, mask=mask_g[:, None] & mask_d[None, :])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(part_lse_ptr + head_base, lse, mask=mask_g)


@triton.jit
def _combine_kernel(
    # pointers
    part_out_ptr,  # [num_rows, num_heads, NUM_SPLITS, HEAD_DIM] float32
    part_lse_ptr,  # [num_rows, num_heads, NUM_SPLITS] float32
    out_ptr,  # [num_rows, num_heads, head_dim]
    # strides
    stride_ot,
    stride_oh,
    # meta
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    base = row.to(tl.int64) * tl.num_programs(1) + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + base * NUM_SPLITS + offs_s, mask=mask_s, other=float("-inf"))
    # Split 0 always holds the row's first tokens (kv_len >= 1), so the max is finite.
    weight = tl.exp2(lse - tl.max(lse, 0))  # [BLOCK_S]; empty splits weigh 0
    parts = tl.load(
        part_out_ptr + (base * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_S, BLOCK_D]
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    o_ptrs = out_ptr + row.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def pick_num_splits(num_rows: int, num_kv_heads: int, max_kv_len: int | None = None) -> int:
    """Splits of the context per row: many when rows are few, 1 once rows x heads fill the GPU.

    A function of host values fixed for a CUDA-graph bucket (rows, heads), so replays and eager
    runs of one bucket split alike; `max_kv_len`, when known, only drops splits that would be empty.
    """
    programs = max(1, num_rows * num_kv_heads)
    splits = min(MAX_SPLITS, max(1, triton.cdiv(_TARGET_PROGRAMS, programs)))
    if max_kv_len is not None:
        splits = min(splits, max(1, triton.cdiv(max_kv_len, _BLOCK_N)))
    return int(splits)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over paged K/V (one or two launches; no host sync).

    Semantics: `out[r, h] = softmax(scale * q[r, h] @ K_r[:, h // G].T) @ V_r[:, h // G]`, where
    `K_r[j] = k_cache[block_tables[r, j // page_size], j % page_size]` for `j < kv_lens[r]`
    and `G = num_heads // num_kv_heads`; float32 softmax, output rounded to q.dtype once.

    Args:
        q: [num_rows, num_heads, head_dim], float32/float16/bfloat16; last dim contiguous.
        k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim], q.dtype; last dim
            contiguous.
        block_tables: [num_rows, max_pages] int32, each row's pages; entries past a row's
            length may hold anything (never read).
        kv_lens: [num_rows] int32 >= 1, context tokens per row, the new token included.
        scale: softmax scale (usually head_dim ** -0.5).
        num_splits: context splits per row (1..MAX_SPLITS); None picks `pick_num_splits`.
        out: optional [num_rows, num_heads, head_dim] output (q.dtype, last dim contiguous).

    Returns:
        out: [num_rows, num_heads, head_dim] in q.dtype.
    """
    num_rows, num_heads, head_dim = q.shape
    out, page_size, num_kv_heads = check_paged_args(
        q, k_cache, v_cache, block_tables, (kv_lens,), out
    )
    if num_rows == 0:
        return out
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = pick_num_splits(num_rows, num_kv_heads)
    assert 1 <= num_splits <= MAX_SPLITS, f"num_splits must be in [1, {MAX_SPLITS}]"
    block_d = max(16, int(triton.next_power_of_2(head_dim)))
    part_out = part_lse = out  # unused placeholders when one split writes `out` directly
    if num_splits > 1:
        part_out = torch.empty(
            num_rows, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            num_rows, num_heads, num_splits, dtype=torch.float32, device=q.device
        )
    grid = (num_rows, num_kv_heads, num_splits)
    _decode_kernel[grid](
        q, k_cache, v_cache, block_tables, kv_lens, out, part_out, part_lse,
        scale * _LOG2E, page_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, int(triton.next_power_of_2(group))),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=_BLOCK_N, NUM_SPLITS=num_splits,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _combine_kernel[(num_rows, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            BLOCK_S=max(2, int(triton.next_power_of_2(num_splits))),
            num_warps=4,
        )  # fmt: skip
    return out
