"""SGMV expand: `y += scale * v @ B[slot].T` per segment and slice, in one Triton launch.

Owns the kernel and its typed launcher; builds no batch metadata and never imports lorasrv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .slot_batch_info import SlotBatchInfo

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"

# Slice column ranges travel as scalar arguments (no per-call tensor, safe under CUDA graph
# capture); q/k/v is the widest fusion the model has.
MAX_SLICES = 3


@triton.jit
def _sgmv_expand_kernel(
    # pointers
    v_ptr,  # [NUM_PARTS, num_tokens, num_slices * max_rank], shrink partials
    b_ptr,  # [num_slots, out_total, max_rank]
    y_ptr,  # [num_tokens, out_total], updated in place
    seg_indptr_ptr,  # [num_segments + 1] int32
    seg_slot_ptr,  # [num_segments] int32
    slot_rank_ptr,  # [num_slots] int32
    slot_scaling_ptr,  # [num_slots] float32
    # sizes
    max_rank,
    slot_cols,
    num_m_blocks,
    num_n_blocks,
    slice_off0,
    slice_off1,
    slice_off2,
    slice_off3,
    # strides
    stride_vp,
    stride_vt,
    stride_vr,
    stride_bs,
    stride_bn,
    stride_br,
    stride_yt,
    stride_yn,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NUM_PARTS: tl.constexpr,
):
    # NOTE: a program's columns never cross a slice boundary: each slice reads its own
    # rank columns of v, so axis 1 is (slice, column block within the slice).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = pid_m // num_m_blocks
    m_block = pid_m % num_m_blocks
    slice_idx = pid_n // num_n_blocks
    n_block = pid_n % num_n_blocks

    slot = tl.load(seg_slot_ptr + seg)
    if slot < 0:  # base-model rows: no LoRA
        return
    rank = tl.load(slot_rank_ptr + slot)
    if rank == 0:
        return
    row_start = tl.load(seg_indptr_ptr + seg) + m_block * BLOCK_M
    seg_end = tl.load(seg_indptr_ptr + seg + 1)
    if row_start >= seg_end:  # empty segment, or past the end of a short one
        return
    col_lo = tl.where(slice_idx == 0, slice_off0, tl.where(slice_idx == 1, slice_off1, slice_off2))
    col_hi = tl.where(slice_idx == 0, slice_off1, tl.where(slice_idx == 1, slice_off2, slice_off3))
    col_start = col_lo + n_block * BLOCK_N
    if col_start >= col_hi:  # narrower slice (k/v next to q)
        return

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = col_start + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < seg_end
    mask_n = offs_n < col_hi

    # Compact v (from the shrink): slot_cols == 0. Stacked v (the base GEMM's extra columns,
    # one block of num_slices * max_rank per slot): each segment reads its own slot's block.
    v_cols = slot * slot_cols + slice_idx * max_rank + offs_r
    v_ptrs = (
        v_ptr + offs_m.to(tl.int64)[:, None] * stride_vt + v_cols[None, :] * stride_vr
    )  # [BLOCK_M, BLOCK_R]
    # NOTE: loaded as [BLOCK_N, BLOCK_R], rank fastest as B stores it (one contiguous run of
    # BLOCK_N * max_rank values), then transposed in registers for the dot.
    b_ptrs = (
        b_ptr
        + slot.to(tl.int64) * stride_bs
        + offs_n.to(tl.int64)[:, None] * stride_bn
        + offs_r[None, :] * stride_br
    )  # [BLOCK_N, BLOCK_R]: a B tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Columns past `rank` are zero padding: stop at rank instead of max_rank.
    for r0 in range(0, rank, BLOCK_R):
        mask_r = (r0 + offs_r) < rank
        mask_v = mask_m[:, None] & mask_r[None, :]
        v_tile = tl.load(v_ptrs + r0 * stride_vr, mask=mask_v, other=0.0).to(tl.float32)
        for part in range(1, NUM_PARTS):  # split-K partials, summed in a fixed order
            v_tile += tl.load(v_ptrs + part * stride_vp + r0 * stride_vr, mask=mask_v, other=0.0)
        # The shrink output is rounded to the adapter dtype once, as in the reference.
        v_tile = v_tile.to(b_ptr.dtype.element_ty)
        b_tile = tl.load(b_ptrs + r0 * stride_br, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc += tl.dot(v_tile, tl.trans(b_tile))

    scaling = tl.load(slot_scaling_ptr + slot)
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask_y = mask_m[:, None] & mask_n[None, :]
    y_tile = tl.load(y_ptrs, mask=mask_y, other=0.0).to(tl.float32)
    # One rounding into y.dtype, as in the reference.
    tl.store(y_ptrs, (y_tile + acc * scaling).to(y_ptr.dtype.element_ty), mask=mask_y)


def _tile_config(
    max_seg_len: int, max_rank: int, num_slices: int, max_width: int
) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_R): 128 columns a program at decode sizes, wider token tiles for
    prefill. Measured inside CUDA graphs on an H200 (bench/stacked_sweep.py): at 64 tokens over
    8 adapters, 16-row tiles win when there are many column programs (gate/up: 76 against 80 us
    with 64 rows), 64-row ones when there are few (o: 12.6 against 14.0 us)."""
    block_r = min(max(16, int(triton.next_power_of_2(max_rank))), 64)
    if max_seg_len > 64:
        return 64, 128, block_r
    block_n = 128
    num_col_programs = num_slices * triton.cdiv(max_width, block_n)
    if max_seg_len <= 16 or num_col_programs >= 128:
        return 16, block_n, block_r
    return int(triton.next_power_of_2(max_seg_len)), block_n, block_r


def sgmv_expand(
    v: torch.Tensor,
    b_stack: torch.Tensor,
    y: torch.Tensor,
    info: SlotBatchInfo,
    slice_offsets: tuple[int, ...],
) -> None:
    """Triton expand, in place; one launch over segments x token blocks x slices x column blocks.

    Semantics: `y[s[i]:s[i+1], off[j]:off[j+1]] += scale[slot[i]] *
    (v[s[i]:s[i+1], j*R:(j+1)*R] @ B[slot[i], off[j]:off[j+1]].T)` for every segment i with
    slot >= 0 and rank > 0 and every slice j; summed in float32, rounded to y.dtype once.

    Args:
        v: [num_tokens, num_slices * max_rank], b_stack.dtype (the shrink output).
        b_stack: [num_slots, out_total, max_rank], float32/float16/bfloat16.
        y: [num_tokens, out_total], any float dtype, may be a strided view; updated in place.
        info: segment table (int32 seg_indptr/seg_slot/slot_rank, float32 slot_scaling).
        slice_offsets: num_slices + 1 host ints (num_slices <= 3), last one == out_total.
    """
    assert v.dtype == b_stack.dtype, "v and b_stack must share a dtype"
    expand_partials(v[None], b_stack, y, info, slice_offsets)


def sgmv_expand_stacked(
    v_all: torch.Tensor,
    b_stack: torch.Tensor,
    y: torch.Tensor,
    info: SlotBatchInfo,
    slice_offsets: tuple[int, ...],
) -> None:
    """`sgmv_expand` where v holds every slot's shrink, as the stacked base GEMM computes it.

    With A's rows stored under the base weight (`[W; A[0]; A[1]; ...]`), one GEMM gives each
    token its base output and its shrink against every slot; this reads each segment's own
    slot block, `v_all[:, slot * num_slices * R:(slot + 1) * num_slices * R]`.

    Args:
        v_all: [num_tokens, num_slots * num_slices * max_rank], b_stack.dtype; may be a
            strided view (the GEMM output's columns past out_total).
        b_stack, y, info, slice_offsets: as in `sgmv_expand`.
    """
    num_slots, _, max_rank = b_stack.shape
    num_slices = len(slice_offsets) - 1
    assert v_all.dtype == b_stack.dtype, "v_all and b_stack must share a dtype"
    assert v_all.shape[1] == num_slots * num_slices * max_rank, (
        "v_all width must be num_slots * num_slices * max_rank"
    )
    _launch_expand(v_all[None], b_stack, y, info, slice_offsets, slot_cols=num_slices * max_rank)


def expand_partials(
    parts: torch.Tensor,
    b_stack: torch.Tensor,
    y: torch.Tensor,
    info: SlotBatchInfo,
    slice_offsets: tuple[int, ...],
) -> None:
    """`sgmv_expand` of `v = parts.sum(0)` rounded to b_stack.dtype, the sum done in-kernel.

    Args:
        parts: [num_parts, num_tokens, num_slices * max_rank], the shrink's split-K partials
            (`lora_shrink.shrink_partials`); b_stack.dtype when num_parts == 1, else float32.
        b_stack, y, info, slice_offsets: as in `sgmv_expand`.
    """
    num_slices = len(slice_offsets) - 1
    assert parts.shape[2] == num_slices * b_stack.shape[2], "v width must be num_slices * max_rank"
    _launch_expand(parts, b_stack, y, info, slice_offsets, slot_cols=0)


def _launch_expand(
    parts: torch.Tensor,
    b_stack: torch.Tensor,
    y: torch.Tensor,
    info: SlotBatchInfo,
    slice_offsets: tuple[int, ...],
    *,
    slot_cols: int,
    tile: tuple[int, int] | None = None,
    num_warps: int = 4,
) -> None:
    """The launch behind both expands; `tile` = (BLOCK_M, BLOCK_N) overrides the table (sweeps)."""
    num_slices = len(slice_offsets) - 1
    assert 1 <= num_slices <= MAX_SLICES, f"1..{MAX_SLICES} slices supported"
    num_parts, num_tokens, _ = parts.shape
    _, out_total, max_rank = b_stack.shape
    assert y.shape == (num_tokens, out_total), "y must be [num_tokens, out_total]"
    assert slice_offsets[-1] <= out_total, "slice_offsets past out_total"
    num_segments = info.seg_slot.shape[0]
    widths = [slice_offsets[j + 1] - slice_offsets[j] for j in range(num_slices)]
    assert min(widths) >= 0, "slice_offsets must be non-decreasing"

    block_m, block_n, block_r = _tile_config(info.max_seg_len, max_rank, num_slices, max(widths))
    if tile is not None:
        block_m, block_n = tile
    num_m_blocks = triton.cdiv(info.max_seg_len, block_m)
    num_n_blocks = triton.cdiv(max(widths), block_n)
    if num_segments * num_m_blocks * num_n_blocks == 0 or num_tokens == 0:
        return
    # Unused slices get empty column ranges at the end, so their programs return at once.
    offs = list(slice_offsets) + [slice_offsets[-1]] * (MAX_SLICES + 1 - len(slice_offsets))

    grid = (num_segments * num_m_blocks, num_slices * num_n_blocks)
    _sgmv_expand_kernel[grid](
        parts, b_stack, y, info.seg_indptr, info.seg_slot, info.slot_rank, info.slot_scaling,
        max_rank, slot_cols, num_m_blocks, num_n_blocks, offs[0], offs[1], offs[2], offs[3],
        parts.stride(0), parts.stride(1), parts.stride(2),
        b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, NUM_PARTS=num_parts,
        num_warps=num_warps,
    )  # fmt: skip
