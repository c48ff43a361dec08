"""Paged prefill attention: each row's new tokens attend causally to themselves and its prefix.

Owns the kernel and its typed launcher. The new tokens' K/V are read from the pages too (they are
stored before attention runs), so one loop covers the cached prefix and the new tokens alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .paged_common import check_paged_args

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    # pointers
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_ptr,  # [num_pages, page_size, num_kv_heads, head_dim]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    tables_ptr,  # [num_rows, max_pages] int32
    query_start_ptr,  # [num_rows + 1] int32, token offsets of each row's new tokens
    kv_lens_ptr,  # [num_rows] int32, prefix + new tokens
    # sizes
    qk_scale,  # softmax scale * log2(e)
    page_size,
    num_m_blocks,
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0) // num_m_blocks
    m_block = tl.program_id(0) % num_m_blocks
    head = tl.program_id(1)
    kv_head = head // GROUP
    q_start = tl.load(query_start_ptr + row)
    q_len = tl.load(query_start_ptr + row + 1) - q_start
    if m_block * BLOCK_M >= q_len:  # a short row: this token block is past its end
        return
    kv_len = tl.load(kv_lens_ptr + row)
    prefix_len = kv_len - q_len

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the row
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    tokens = (q_start + offs_m).to(tl.int64)
    q_ptrs = q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    last_pos = prefix_len + offs_m  # [BLOCK_M], the last context position each query sees

    # A finite floor instead of -inf keeps exp2 of fully masked tiles at 0, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = tables_ptr + row.to(tl.int64) * stride_tr
    # Causal: nothing past this block's last query position is visible.
    end = tl.minimum(kv_len, prefix_len + (m_block + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        pos = n0 + offs_n  # [BLOCK_N]
        mask_n = pos < end
        page = tl.load(table_row + pos // page_size, mask=mask_n, other=0).to(tl.int64)
        in_page = (pos % page_size).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k_ptrs = k_ptr + page[:, None] * stride_kp + in_page[:, None] * stride_ks
        k = tl.load(k_ptrs + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        visible = mask_n[None, :] & (pos[None, :] <= last_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_ptr + page[:, None] * stride_vp + in_page[:, None] * stride_vs
        v = tl.load(v_ptrs + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    kv_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each row's new tokens over its paged prefix and themselves.

    Semantics: for row r with `n = query_start[r+1] - query_start[r]` new tokens and
    `c = kv_lens[r] - n` cached ones, token i of the row (query `q[query_start[r] + i]`)
    attends to context positions `0 .. c + i` of `K_r`/`V_r` (paged as in the decode op),
    GQA head `h // G`; float32 softmax, output rounded to q.dtype once. Rows of any length
    (decode rows included) may share a launch.

    Args:
        q: [num_tokens, num_heads, head_dim], float32/float16/bfloat16; last dim contiguous.
        k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim], q.dtype, holding the
            new tokens' K/V already.
        block_tables: [num_rows, max_pages] int32.
        query_start: [num_rows + 1] int32, cumulative new-token counts (query_start[0] == 0).
        kv_lens: [num_rows] int32, cached + new tokens per row.
        max_query_len: host int >= every row's new-token count (sizes the grid).
        scale: softmax scale.
        out: optional [num_tokens, num_heads, head_dim] output (q.dtype, last dim contiguous).

    Returns:
        out: [num_tokens, num_heads, head_dim] in q.dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    out, page_size, num_kv_heads = check_paged_args(
        q, k_cache, v_cache, block_tables, (query_start, kv_lens), out
    )
    num_rows = kv_lens.shape[0]
    if num_tokens == 0 or num_rows == 0 or max_query_len <= 0:
        return out
    block_d = max(16, int(triton.next_power_of_2(head_dim)))
    # Short rows (decode rows in a mixed step) waste less of a small query tile.
    block_m = 16 if max_query_len <= 16 else 64
    num_m_blocks = triton.cdiv(max_query_len, block_m)
    grid = (num_rows * num_m_blocks, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start, kv_lens,
        scale * _LOG2E, page_size, num_m_blocks,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
