"""The residual add fused with the RMSNorm after it, as one Triton launch; and the same with a
one-slice module's stacked LoRA delta (o_proj, down_proj) added on the way, so that the stacked
LoRA path needs no separate expand for them.

Owns the kernels and their typed launchers; rounding follows torch step by step (the add is
bitwise torch's; the norm differs only in the float32 summation order of the mean).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .batch_info import LoraBatchInfo

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"


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
def _add_rms_norm_lora_kernel(
    # pointers
    x_ptr,  # [num_rows, num_cols], the residual stream
    d_ptr,  # [num_rows, num_cols], a block's base output (its LoRA delta still to add)
    v_ptr,  # [num_rows, num_slots * max_rank], every slot's shrink
    b_ptr,  # [num_slots, num_cols, max_rank]
    w_ptr,  # [num_cols]
    sum_ptr,  # [num_rows, num_cols], x + (d + delta)
    out_ptr,  # [num_rows, num_cols], rms_norm of that
    seg_indptr_ptr,  # [num_segments + 1] int32
    seg_slot_ptr,  # [num_segments] int32
    slot_rank_ptr,  # [num_slots] int32
    slot_scaling_ptr,  # [num_slots] float32
    # sizes
    num_cols,
    max_rank,
    num_segments,
    eps,
    # strides
    stride_x,
    stride_d,
    stride_v,
    stride_bs,
    stride_bn,
    stride_s,
    stride_o,
    # meta
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0)
    slot = tl.full([], -1, tl.int32)
    for seg in range(0, num_segments):  # a handful of segments; rows outside all keep -1
        lo = tl.load(seg_indptr_ptr + seg)
        hi = tl.load(seg_indptr_ptr + seg + 1)
        slot = tl.where((row >= lo) & (row < hi), tl.load(seg_slot_ptr + seg), slot)
    rank = tl.load(slot_rank_ptr + tl.maximum(slot, 0))
    rank = tl.where(slot >= 0, rank, 0)
    scaling = tl.load(slot_scaling_ptr + tl.maximum(slot, 0))
    row64 = row.to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank  # all false for base rows: the delta is exactly 0
    v = tl.load(v_ptr + row64 * stride_v + tl.maximum(slot, 0) * max_rank + offs_r, mask=mask_r,
                other=0.0).to(tl.float32)  # fmt: skip
    b_base = b_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bs
    sum_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, num_cols, BLOCK_N):
        offs = c0 + tl.arange(0, BLOCK_N)
        mask = offs < num_cols
        # B rows load rank-fastest, as stored: BLOCK_N * max_rank contiguous values.
        b = tl.load(b_base + offs[:, None] * stride_bn + offs_r[None, :],
                    mask=mask[:, None] & mask_r[None, :], other=0.0).to(tl.float32)  # fmt: skip
        delta = tl.sum(b * v[None, :], 1) * scaling
        d = tl.load(d_ptr + row64 * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
        # The expand's rounding of d + delta, then torch's rounding of the residual add.
        d = (d + delta).to(dtype).to(tl.float32)
        x = tl.load(x_ptr + row64 * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        total = (x + d).to(dtype)
        tl.store(sum_ptr + row64 * stride_s + offs, total, mask=mask)
        t = total.to(tl.float32)
        sum_sq += t * t
    inv = tl.rsqrt(tl.sum(sum_sq, 0) / num_cols + eps)
    for c0 in range(0, num_cols, BLOCK_N):
        offs = c0 + tl.arange(0, BLOCK_N)
        mask = offs < num_cols
        # NOTE: this program wrote these values just above; its own stores are visible to it.
        t = tl.load(sum_ptr + row64 * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        normed = (t * inv).to(dtype).to(tl.float32)
        tl.store(out_ptr + row64 * stride_o + offs, (w * normed).to(dtype), mask=mask)


def add_rms_norm_lora(
    x: torch.Tensor,
    delta: torch.Tensor,
    v_all: torch.Tensor,
    b_stack: torch.Tensor,
    info: LoraBatchInfo,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm(x, d, weight, eps)` where d is `delta` plus its stacked LoRA delta.

    Semantics: `d = delta` after `sgmv_expand_stacked(v_all, b_stack, d, info, (0, n))` (one
    rounding), then `s = x + d` and `rms_norm(s)` as in `add_rms_norm`; one launch, and `delta`
    is not written. Rows outside every segment, and base rows, get no delta.

    Args:
        x: [num_rows, num_cols]; delta: [num_rows, num_cols] (a one-slice module's output, a
            column window of its stacked GEMM); both with contiguous columns.
        v_all: [num_rows, num_slots * max_rank], the same GEMM's shrink columns.
        b_stack: [num_slots, num_cols, max_rank]; weight: [num_cols]; one dtype for all.

    Returns:
        (s, normed), both [num_rows, num_cols] in x.dtype, contiguous.
    """
    num_rows, num_cols = x.shape
    num_slots, b_cols, max_rank = b_stack.shape
    assert delta.shape == x.shape, "delta must match x"
    assert b_cols == num_cols, "b_stack must have x's width"
    assert v_all.shape == (num_rows, num_slots * max_rank), "v_all: one rank block per slot"
    assert weight.shape == (num_cols,), "weight must be [num_cols]"
    assert x.dtype == delta.dtype == v_all.dtype == b_stack.dtype == weight.dtype, "one dtype"
    assert x.stride(1) == delta.stride(1) == v_all.stride(1) == 1, "columns must be contiguous"
    assert b_stack.stride(2) == 1, "b_stack: rank must be contiguous"
    total = torch.empty(num_rows, num_cols, dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    if num_rows == 0:
        return total, out
    block_r = max(16, int(triton.next_power_of_2(max_rank)))
    block_n = max(64, 8192 // block_r)  # a [block_n, block_r] B tile per chunk
    _add_rms_norm_lora_kernel[(num_rows,)](
        x, delta, v_all, b_stack, weight, total, out,
        info.seg_indptr, info.seg_slot, info.slot_rank, info.slot_scaling,
        num_cols, max_rank, info.seg_slot.shape[0], eps,
        x.stride(0), delta.stride(0), v_all.stride(0), b_stack.stride(0), b_stack.stride(1),
        total.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return total, out
