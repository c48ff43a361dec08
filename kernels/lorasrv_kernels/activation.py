"""The gated MLP's `silu(gate) * up` as one Triton launch, alone or with the gate/up LoRA delta
added on the way (the stacked path's gate/up expand). Owns the kernels and typed launchers;
rounding follows torch step by step; never imports lorasrv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .slot_batch_info import SlotBatchInfo

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"


@triton.jit
def _silu_mul_kernel(
    # pointers
    gate_up_ptr,  # [num_rows, 2 * num_cols]: gate columns, then up columns
    out_ptr,  # [num_rows, num_cols]
    # sizes
    num_cols,
    # strides
    stride_in,
    stride_out,
    # meta
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + num_cols + offs, mask=mask, other=0.0)
    # torch: silu in float32 rounded to the dtype, then the product rounded again.
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * up.to(tl.float32)).to(dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for the fused gate/up projection's output, one launch.

    Semantics: `F.silu(g) * u` with `g, u = gate_up.chunk(2, -1)`, each op rounded to
    gate_up.dtype as torch does (equal up to the last bit of float32 `exp`).

    Args:
        gate_up: [num_rows, 2 * num_cols], float32/float16/bfloat16; rows may be strided,
            columns contiguous.

    Returns:
        [num_rows, num_cols] in gate_up.dtype, contiguous.
    """
    num_rows, width = gate_up.shape
    assert width % 2 == 0, "gate_up must hold gate and up halves"
    assert gate_up.stride(1) == 1, "gate_up: columns must be contiguous"
    num_cols = width // 2
    out = torch.empty(num_rows, num_cols, dtype=gate_up.dtype, device=gate_up.device)
    if num_rows == 0:
        return out
    block = min(1024, int(triton.next_power_of_2(num_cols)))
    grid = (num_rows, triton.cdiv(num_cols, block))
    _silu_mul_kernel[grid](
        gate_up, out, num_cols, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out


@triton.jit
def _silu_mul_lora_kernel(
    # pointers
    gate_up_ptr,  # [num_tokens, 2 * num_cols], the base GEMM's gate then up columns
    v_ptr,  # [num_tokens, num_slots * 2 * max_rank], every slot's shrink (gate, then up)
    b_ptr,  # [num_slots, 2 * num_cols, max_rank]
    out_ptr,  # [num_tokens, num_cols]
    seg_indptr_ptr,  # [num_segments + 1] int32
    seg_slot_ptr,  # [num_segments] int32
    slot_rank_ptr,  # [num_slots] int32
    slot_scaling_ptr,  # [num_slots] float32
    # sizes
    num_cols,
    max_rank,
    num_m_blocks,
    # strides
    stride_gt,
    stride_vt,
    stride_bs,
    stride_bn,
    stride_ot,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = pid_m // num_m_blocks
    row_start = tl.load(seg_indptr_ptr + seg) + (pid_m % num_m_blocks) * BLOCK_M
    seg_end = tl.load(seg_indptr_ptr + seg + 1)
    if row_start >= seg_end:  # empty segment, or past the end of a short one
        return
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < seg_end
    mask_n = offs_n < num_cols
    mask = mask_m[:, None] & mask_n[None, :]
    dtype = out_ptr.dtype.element_ty
    g_ptrs = gate_up_ptr + offs_m.to(tl.int64)[:, None] * stride_gt + offs_n[None, :]
    gate = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_N]
    up = tl.load(g_ptrs + num_cols, mask=mask, other=0.0).to(tl.float32)
    slot = tl.load(seg_slot_ptr + seg)
    rank = tl.load(slot_rank_ptr + tl.maximum(slot, 0))
    if (slot >= 0) & (rank > 0):
        offs_r = tl.arange(0, BLOCK_R)
        v_row = v_ptr + offs_m.to(tl.int64)[:, None] * stride_vt + slot * 2 * max_rank
        # B tiles load as [BLOCK_N, BLOCK_R], rank fastest as stored (coalesced), then transpose.
        b_cols = b_ptr + slot.to(tl.int64) * stride_bs + offs_n.to(tl.int64)[:, None] * stride_bn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):  # columns past `rank` are zero padding
            mask_r = (r0 + offs_r) < rank
            mask_v = mask_m[:, None] & mask_r[None, :]
            mask_b = mask_n[:, None] & mask_r[None, :]
            v_g = tl.load(v_row + (r0 + offs_r)[None, :], mask=mask_v, other=0.0)
            v_u = tl.load(v_row + (max_rank + r0 + offs_r)[None, :], mask=mask_v, other=0.0)
            b_g = tl.load(b_cols + (r0 + offs_r)[None, :], mask=mask_b, other=0.0)
            b_u = tl.load(b_cols + num_cols * stride_bn + (r0 + offs_r)[None, :], mask=mask_b,
                          other=0.0)  # fmt: skip
            acc_g += tl.dot(v_g, tl.trans(b_g))
            acc_u += tl.dot(v_u, tl.trans(b_u))
        scaling = tl.load(slot_scaling_ptr + slot)
        # The expand's one rounding of `y + delta` into the dtype, then the activation's.
        gate = (gate + acc_g * scaling).to(dtype).to(tl.float32)
        up = (up + acc_u * scaling).to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, (act * up).to(dtype), mask=mask)


def silu_mul_lora(
    gate_up: torch.Tensor, v_all: torch.Tensor, b_stack: torch.Tensor, info: SlotBatchInfo
) -> torch.Tensor:
    """`silu(g) * u` of the gate/up output with each segment's LoRA delta added first.

    Semantics: `silu_mul(y)` where `y = gate_up` after `sgmv_expand_stacked(v_all, b_stack, y,
    info, (0, n, 2n))`, with the same roundings, in one launch and without writing y.

    Args:
        gate_up: [num_tokens, 2 * num_cols], the stacked GEMM's base columns (strided rows,
            contiguous columns).
        v_all: [num_tokens, num_slots * 2 * max_rank], the stacked GEMM's shrink columns.
        b_stack: [num_slots, 2 * num_cols, max_rank], gate_up.dtype.
        info: segments covering every token (base rows are segments of slot -1).

    Returns:
        [num_tokens, num_cols] in gate_up.dtype, contiguous; rows outside every segment unset.
    """
    num_tokens, width = gate_up.shape
    num_slots, out_total, max_rank = b_stack.shape
    assert width % 2 == 0, "gate_up must hold gate and up halves"
    assert out_total == width, "b_stack must have gate_up's width"
    assert gate_up.stride(1) == 1, "gate_up: columns must be contiguous"
    assert v_all.stride(1) == 1, "v_all: columns must be contiguous"
    assert b_stack.stride(2) == 1, "b_stack: rank must be contiguous"
    assert v_all.shape == (num_tokens, num_slots * 2 * max_rank), "v_all: one block per slot"
    assert gate_up.dtype == v_all.dtype == b_stack.dtype, "one dtype for gate_up, v_all, B"
    num_cols = width // 2
    out = torch.empty(num_tokens, num_cols, dtype=gate_up.dtype, device=gate_up.device)
    num_segments = info.seg_slot.shape[0]
    if num_tokens == 0 or num_segments == 0:
        return out
    # Decode: 16-row tiles (segments are short; wide rows give plenty of column programs).
    block_m = 16 if info.max_seg_len <= 64 else 64
    block_n, block_r = 128, min(max(16, int(triton.next_power_of_2(max_rank))), 64)
    num_m_blocks = triton.cdiv(info.max_seg_len, block_m)
    grid = (num_segments * num_m_blocks, triton.cdiv(num_cols, block_n))
    _silu_mul_lora_kernel[grid](
        gate_up, v_all, b_stack, out,
        info.seg_indptr, info.seg_slot, info.slot_rank, info.slot_scaling,
        num_cols, max_rank, num_m_blocks,
        gate_up.stride(0), v_all.stride(0), b_stack.stride(0), b_stack.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
    )  # fmt: skip
    return out
