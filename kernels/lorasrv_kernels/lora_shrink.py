"""SGMV shrink: `v = x @ A[slot].T` per segment, all segments and slices in one Triton launch.

Owns the kernel and its typed launcher; builds no batch metadata and never imports lorasrv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .slot_batch_info import SlotBatchInfo

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"

# Split-K only while the grid is smaller than this many programs (decode: few segments,
# long in_features), so that more SMs stream the A rows.
# Measured inside CUDA graphs on an H200 (bench/lora_sweep.py, bench/results/lora_sweep_h200.json):
# each split-K partial is re-read by every expand column block, so fewer, longer splits win at
# decode. 64 programs: 53.5 us per layer (q/k/v + gate/up + o + down) at 64 tokens over 8
# adapters, against 90 us with 256; about 11% slower than 256 at 32 adapters.
_TARGET_PROGRAMS = 64
_MIN_K_CHUNKS_PER_SPLIT = 2


@triton.jit
def _sgmv_shrink_kernel(
    # pointers
    x_ptr,  # [num_tokens, in_features]
    a_ptr,  # [num_slots, num_slices * max_rank, in_features]
    v_ptr,  # [SPLIT_K, num_tokens, num_slices * max_rank], x.dtype, or float32 when SPLIT_K > 1
    seg_indptr_ptr,  # [num_segments + 1] int32
    seg_slot_ptr,  # [num_segments] int32
    slot_rank_ptr,  # [num_slots] int32
    # sizes
    in_features,
    max_rank,
    num_m_blocks,
    num_r_blocks,
    # strides
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_vs,
    stride_vt,
    stride_vr,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # NOTE: axis 0 is segment-major so the token blocks of one segment run next to each other
    # and share the adapter's A rows in L2.
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    seg = pid_m // num_m_blocks
    m_block = pid_m % num_m_blocks
    slice_idx = pid_r // num_r_blocks
    r_block = pid_r % num_r_blocks

    slot = tl.load(seg_slot_ptr + seg)
    if slot < 0:  # base-model rows: no LoRA
        return
    rank = tl.load(slot_rank_ptr + slot)
    row_start = tl.load(seg_indptr_ptr + seg) + m_block * BLOCK_M
    seg_end = tl.load(seg_indptr_ptr + seg + 1)
    if row_start >= seg_end:  # empty segment, or past the end of a short one
        return
    if r_block * BLOCK_R >= rank:  # rank 0, or only zero padding in this block
        return

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < seg_end
    # Rows past `rank` are zero padding: masking them skips their bytes, not just their math.
    mask_r = offs_r < rank
    a_rows = slice_idx * max_rank + offs_r

    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xt + offs_k[None, :] * stride_xk
    a_ptrs = (
        a_ptr
        + slot.to(tl.int64) * stride_as
        + a_rows[None, :] * stride_ar
        + offs_k[:, None] * stride_ak
    )  # [BLOCK_K, BLOCK_R]: A^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, in_features, SPLIT_K * BLOCK_K):
        mask_k = (k0 + offs_k) < in_features
        x_tile = tl.load(x_ptrs + k0 * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a_tile = tl.load(a_ptrs + k0 * stride_ak, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc += tl.dot(x_tile, a_tile)

    # NOTE: each split writes its own partial (no atomics), so results are bitwise
    # reproducible run to run, which CUDA-graph-vs-eager token identity relies on.
    v_ptrs = (
        v_ptr
        + pid_k.to(tl.int64) * stride_vs
        + offs_m.to(tl.int64)[:, None] * stride_vt
        + a_rows[None, :] * stride_vr
    )
    mask_v = mask_m[:, None] & mask_r[None, :]
    tl.store(v_ptrs, acc.to(v_ptr.dtype.element_ty), mask=mask_v)


def _block_m(max_seg_len: int) -> int:
    # Decode segments are 1-64 tokens; 16 is the smallest tile tl.dot accepts.
    return 16 if max_seg_len <= 16 else 32 if max_seg_len <= 32 else 64


def _block_r(max_rank: int) -> int:
    return min(max(16, int(triton.next_power_of_2(max_rank))), 64)


def _pick_split_k(num_programs: int, in_features: int, block_k: int) -> int:
    k_chunks = triton.cdiv(in_features, block_k)
    split_k = 1
    while (
        num_programs * split_k < _TARGET_PROGRAMS
        and k_chunks >= 2 * split_k * _MIN_K_CHUNKS_PER_SPLIT
    ):
        split_k *= 2
    return split_k


def shrink_partials(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    info: SlotBatchInfo,
    num_slices: int,
    *,
    split_k: int | None = None,
    zero_fill: bool = True,
) -> torch.Tensor:
    """The shrink's K-split partial sums, `[split_k, num_tokens, num_slices * max_rank]`.

    x.dtype when split_k == 1, else float32 (summed over dim 0 in order by the consumer).
    Only rows of active segments and columns below each rank are written; zero_fill=False
    leaves the rest uninitialized (the fused expand never reads them).
    """
    num_tokens, in_features = x.shape
    _, stacked_rank, a_in = a_stack.shape
    assert a_in == in_features, "a_stack in_features must match x"
    assert stacked_rank % num_slices == 0, "a_stack rows must be num_slices * max_rank"
    assert a_stack.dtype == x.dtype, "x and a_stack must share a dtype"
    max_rank = stacked_rank // num_slices
    num_segments = info.seg_slot.shape[0]

    block_m, block_r, block_k = _block_m(info.max_seg_len), _block_r(max_rank), 64
    num_m_blocks = triton.cdiv(info.max_seg_len, block_m)
    num_r_blocks = triton.cdiv(max_rank, block_r)
    num_programs = num_segments * num_m_blocks * num_slices * num_r_blocks
    if split_k is None:
        split_k = _pick_split_k(num_programs, in_features, block_k)
    assert split_k >= 1, "split_k must be positive"
    out_dtype = x.dtype if split_k == 1 else torch.float32
    alloc = torch.zeros if zero_fill else torch.empty
    parts = alloc(split_k, num_tokens, stacked_rank, dtype=out_dtype, device=x.device)
    if num_programs == 0 or num_tokens == 0:
        return parts

    grid = (num_segments * num_m_blocks, num_slices * num_r_blocks, split_k)
    _sgmv_shrink_kernel[grid](
        x, a_stack, parts, info.seg_indptr, info.seg_slot, info.slot_rank,
        in_features, max_rank, num_m_blocks, num_r_blocks,
        x.stride(0), x.stride(1),
        a_stack.stride(0), a_stack.stride(1), a_stack.stride(2),
        parts.stride(0), parts.stride(1), parts.stride(2),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k,
    )  # fmt: skip
    return parts


def sgmv_shrink(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    info: SlotBatchInfo,
    num_slices: int,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """Triton shrink, one launch over segments x token blocks x (slice, rank block) x split-K.

    Semantics: `v[s[i]:s[i+1], j*R:(j+1)*R] = x[s[i]:s[i+1]] @ A[slot[i], j*R:(j+1)*R].T`
    for every segment i with slot >= 0 and rank > 0; other rows of v are zero.

    Args:
        x: [num_tokens, in_features], float32/float16/bfloat16.
        a_stack: [num_slots, num_slices * max_rank, in_features], x.dtype.
        info: segment table (int32 seg_indptr/seg_slot/slot_rank on x.device).
        num_slices: 1 (o/down), 2 (gate/up) or 3 (q/k/v).
        split_k: K splits (>= 1), float32 partials summed after the launch; None picks one.

    Returns:
        v: [num_tokens, num_slices * max_rank] in x.dtype, accumulated in float32.
    """
    parts = shrink_partials(x, a_stack, info, num_slices, split_k=split_k)
    return parts[0] if parts.shape[0] == 1 else parts.sum(0).to(x.dtype)
