"""RMSNorm (alone or after the residual add) and rotary embedding as single Triton launches
(the torch versions take ~6 each).

Owns the kernels and typed launchers; rounding follows HF's torch code step by step, so rotary is
bitwise equal to it and RMSNorm differs only in the float32 summation order of the mean.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"


@triton.jit
def _rms_norm_kernel(
    # pointers
    x_ptr,  # [num_rows, num_cols]
    w_ptr,  # [num_cols]
    out_ptr,  # [num_rows, num_cols]
    # sizes
    num_cols,
    eps,
    # strides
    stride_x,
    stride_o,
    # meta
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < num_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, 0) / num_cols
    # HF: normalize in float32, round to the input dtype, then scale (rounded once more).
    normed = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm, one program per row.

    Semantics: `weight * (x32 * rsqrt(mean(x32**2, -1) + eps)).to(x.dtype)` with
    `x32 = x.float()` (HF's LlamaRMSNorm), in x.dtype.

    Args:
        x: [..., num_cols], float32/float16/bfloat16; rows need not be contiguous in 2-D.
        weight: [num_cols], x.dtype.

    Returns:
        [..., num_cols] in x.dtype, contiguous.
    """
    num_cols = x.shape[-1]
    assert weight.shape == (num_cols,), "weight must be [num_cols]"
    assert weight.dtype == x.dtype, "weight and x must share a dtype"
    x2 = x.reshape(-1, num_cols)  # a view for 2-D inputs; a copy only for odd 3-D strides
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.view(x.shape)
    block = int(triton.next_power_of_2(num_cols))
    _rms_norm_kernel[(x2.shape[0],)](
        x2, weight, out, num_cols, eps, x2.stride(0), out.stride(0),
        BLOCK=block, num_warps=max(1, min(16, block // 256)),
    )  # fmt: skip
    return out.view(x.shape)


@triton.jit
def _add_rms_norm_kernel(
    # pointers
    x_ptr,  # [num_rows, num_cols]
    d_ptr,  # [num_rows, num_cols], added to x
    w_ptr,  # [num_cols]
    sum_ptr,  # [num_rows, num_cols], x + d
    out_ptr,  # [num_rows, num_cols], rms_norm(x + d)
    # sizes
    num_cols,
    eps,
    # strides
    stride_x,
    stride_d,
    stride_s,
    stride_o,
    # meta
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < num_cols
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
    # torch's `x + d` in x.dtype: the float32 sum rounded once; the norm reads the rounded sum.
    total = (x + d).to(dtype)
    tl.store(sum_ptr + row * stride_s + offs, total, mask=mask)
    t = total.to(tl.float32)
    variance = tl.sum(t * t, 0) / num_cols
    normed = (t * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(dtype), mask=mask)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm in one launch: `(s, rms_norm(s))` with `s = x + delta`.

    Semantics: `s` is torch's `x + delta` in x.dtype (bitwise); the norm is `rms_norm(s)`.

    Args:
        x, delta: [num_rows, num_cols], same float dtype; rows may be strided, columns
            contiguous (a column window of a wider GEMM output is fine).
        weight: [num_cols], x.dtype.

    Returns:
        (s, normed), both [num_rows, num_cols] in x.dtype, contiguous.
    """
    num_rows, num_cols = x.shape
    assert delta.shape == x.shape, "delta must match x"
    assert weight.shape == (num_cols,), "weight must be [num_cols]"
    assert delta.dtype == x.dtype, "delta and x must share a dtype"
    assert weight.dtype == x.dtype, "weight and x must share a dtype"
    x = x if x.stride(1) == 1 else x.contiguous()
    delta = delta if delta.stride(1) == 1 else delta.contiguous()
    total = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    if num_rows == 0:
        return total, out
    block = int(triton.next_power_of_2(num_cols))
    _add_rms_norm_kernel[(num_rows,)](
        x, delta, weight, total, out, num_cols, eps,
        x.stride(0), delta.stride(0), total.stride(0), out.stride(0),
        BLOCK=block, num_warps=max(1, min(16, block // 256)),
    )  # fmt: skip
    return total, out


@triton.jit
def _rotary_kernel(
    # pointers
    x_ptr,  # [num_tokens, num_heads, 2 * HALF]
    cos_ptr,  # [num_tokens, 2 * HALF]
    sin_ptr,  # [num_tokens, 2 * HALF]
    out_ptr,  # [num_tokens, num_heads, 2 * HALF], contiguous
    # sizes
    num_heads,
    # strides
    stride_xt,
    stride_xh,
    stride_ct,
    stride_st,
    # meta
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    mask = (offs_h < num_heads)[:, None] & mask_d[None, :]
    x_ptrs = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + token * stride_ct + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + token * stride_ct + HALF + offs_d, mask=mask_d, other=0.0)
    s1 = tl.load(sin_ptr + token * stride_st + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + token * stride_st + HALF + offs_d, mask=mask_d, other=0.0)
    c2 = c2.to(tl.float32)
    s2 = s2.to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # torch: x * cos + cat(-x2, x1) * sin, each product rounded, then the sum rounded.
    out1 = (x1 * c1[None, :]).to(dtype).to(tl.float32) + (-x2 * s1[None, :]).to(dtype).to(
        tl.float32
    )
    out2 = (x2 * c2[None, :]).to(dtype).to(tl.float32) + (x1 * s2[None, :]).to(dtype).to(tl.float32)
    o_ptrs = out_ptr + token * num_heads * 2 * HALF + offs_h[:, None] * 2 * HALF + offs_d[None, :]
    tl.store(o_ptrs, out1.to(dtype), mask=mask)
    tl.store(o_ptrs + HALF, out2.to(dtype), mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Triton rotary embedding (rotate-half convention), one program per token.

    Semantics: `x * cos[:, None] + cat(-x[..., D/2:], x[..., :D/2]) * sin[:, None]`, each
    product and the sum rounded to x.dtype as torch does (bitwise equal to it).

    Args:
        x: [num_tokens, num_heads, head_dim], head_dim even; last dim contiguous (strided
            column windows of a fused qkv output are fine).
        cos, sin: [num_tokens, head_dim], x.dtype; last dim contiguous.

    Returns:
        [num_tokens, num_heads, head_dim] in x.dtype, contiguous.
    """
    num_tokens, num_heads, head_dim = x.shape
    assert head_dim % 2 == 0, "head_dim must be even"
    assert cos.shape == (num_tokens, head_dim), "cos must be [num_tokens, head_dim]"
    assert sin.shape == cos.shape, "sin must be [num_tokens, head_dim]"
    assert cos.dtype == x.dtype, "cos/sin and x must share a dtype"
    assert sin.dtype == x.dtype, "cos/sin and x must share a dtype"
    assert x.stride(2) == 1, "x: last dim must be contiguous"
    assert cos.stride(1) == 1, "cos: last dim must be contiguous"
    assert sin.stride(1) == 1, "sin: last dim must be contiguous"
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        x, cos, sin, out, num_heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
        HALF=half, BLOCK_H=int(triton.next_power_of_2(num_heads)),
        BLOCK_HALF=int(triton.next_power_of_2(half)), num_warps=4,
    )  # fmt: skip
    return out
