"""KV store: write each new token's K and V into its page slot, in one launch for both.

Owns the kernel and its typed launcher. A negative slot skips the token (CUDA-graph padding rows
must write nothing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"


@triton.jit
def _store_kv_kernel(
    # pointers
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_pages, page_size, num_kv_heads, head_dim], any page stride
    v_cache_ptr,
    slot_ptr,  # [num_tokens] int32/int64, page * page_size + offset; < 0 = skip
    # sizes
    num_kv_heads,
    head_dim,
    page_size,
    # strides
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ckp,
    stride_cks,
    stride_ckh,
    stride_cvp,
    stride_cvs,
    stride_cvh,
    # meta
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < head_dim)[None, :]
    src = token.to(tl.int64)
    k = tl.load(k_ptr + src * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + src * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    page = slot // page_size
    in_page = slot % page_size
    k_dst = k_cache_ptr + page * stride_ckp + in_page * stride_cks
    v_dst = v_cache_ptr + page * stride_cvp + in_page * stride_cvs
    k_dst += offs_h[:, None] * stride_ckh + offs_d[None, :]
    v_dst += offs_h[:, None] * stride_cvh + offs_d[None, :]
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton KV store, in place (one launch, one program per token).

    Semantics: for every token t with `s = slot_mapping[t] >= 0`:
    `k_cache[s // page_size, s % page_size] = k[t]` and likewise for v; tokens with s < 0
    write nothing.

    Args:
        k, v: [num_tokens, num_kv_heads, head_dim], any float dtype; last dim contiguous
            (strided views of a fused qkv output are fine).
        k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim], last dim contiguous;
            any page stride (the arena's page-major views: one page spans every layer).
        slot_mapping: [num_tokens] int32/int64, distinct among non-negative entries.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    assert v.shape == k.shape
    assert slot_mapping.shape == (num_tokens,)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert v_cache.shape == k_cache.shape
    assert k.stride(2) == 1
    assert v.stride(2) == 1
    assert k_cache.stride(3) == 1
    assert v_cache.stride(3) == 1
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        num_kv_heads, head_dim, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_H=int(triton.next_power_of_2(num_kv_heads)),
        BLOCK_D=int(triton.next_power_of_2(head_dim)),
        num_warps=4,
    )  # fmt: skip
