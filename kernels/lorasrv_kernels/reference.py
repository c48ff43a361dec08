"""Plain-torch LoRA ops: the specification the Triton kernels are tested against.

Also the `torch` backend used in production on CPU, so each op is vectorized per segment
(a Python loop over the few segments and slices of a step, never over rows or tokens).
"""

from __future__ import annotations

import torch

from .slot_batch_info import SlotBatchInfo

# (start, end, slot, rank) for each segment that has work; host values.
_Segment = tuple[int, int, int, int]


def active_segments(info: SlotBatchInfo) -> list[_Segment]:
    """Segments with a slot, a non-zero rank and at least one row (one device sync)."""
    indptr = info.seg_indptr.tolist()
    slots = info.seg_slot.tolist()
    ranks = info.slot_rank.tolist()
    segments = []
    for i, slot in enumerate(slots):
        start, end = indptr[i], indptr[i + 1]
        if slot < 0 or end <= start or ranks[slot] == 0:
            continue
        segments.append((start, end, slot, ranks[slot]))
    return segments


def sgmv_shrink(
    x: torch.Tensor, a_stack: torch.Tensor, info: SlotBatchInfo, num_slices: int
) -> torch.Tensor:
    """Reference shrink.

    Semantics: `v[s[i]:s[i+1], j*R:(j+1)*R] = x[s[i]:s[i+1]] @ A[slot[i], j*R:(j+1)*R].T`
    for every segment i with slot >= 0 and rank > 0; other rows of v are zero.

    Args:
        x: [num_tokens, in_features], float32/float16/bfloat16.
        a_stack: [num_slots, num_slices * max_rank, in_features], x.dtype.
        info: segment table; rows of x sorted by segment.
        num_slices: 1 (o/down), 2 (gate/up) or 3 (q/k/v).

    Returns:
        v: [num_tokens, num_slices * max_rank] in x.dtype, accumulated in float32.
    """
    num_tokens, _ = x.shape
    max_rank = a_stack.shape[1] // num_slices
    v = x.new_zeros(num_tokens, num_slices, max_rank)  # [num_tokens, num_slices, max_rank]
    for start, end, slot, rank in active_segments(info):
        # NOTE: rows past `rank` are zero padding; skipping them is only an optimization.
        a = a_stack[slot].view(num_slices, max_rank, -1)[:, :rank]  # [num_slices, rank, in]
        v_seg = torch.einsum("tk,nrk->tnr", x[start:end].float(), a.float())
        v[start:end, :, :rank] = v_seg.to(x.dtype)
    return v.view(num_tokens, num_slices * max_rank)


def sgmv_expand(
    v: torch.Tensor,
    b_stack: torch.Tensor,
    y: torch.Tensor,
    info: SlotBatchInfo,
    slice_offsets: tuple[int, ...],
) -> None:
    """Reference expand, in place.

    Semantics: `y[s[i]:s[i+1], off[j]:off[j+1]] += scale[slot[i]] *
    (v[s[i]:s[i+1], j*R:(j+1)*R] @ B[slot[i], off[j]:off[j+1]].T)` for every active segment i
    and slice j; the sum is formed in float32 and rounded to y.dtype once.

    Args:
        v: [num_tokens, num_slices * max_rank], the shrink output.
        b_stack: [num_slots, out_total, max_rank], v.dtype.
        y: [num_tokens, out_total], updated in place (may be a strided view).
        info: segment table; rows sorted by segment.
        slice_offsets: num_slices + 1 host ints, `slice_offsets[-1] == out_total`.
    """
    num_slices = len(slice_offsets) - 1
    assert v.shape[1] == num_slices * b_stack.shape[2], "v width must be num_slices * max_rank"
    _expand(v, b_stack, y, info, slice_offsets, slot_cols=0)


def sgmv_expand_stacked(
    v_all: torch.Tensor,
    b_stack: torch.Tensor,
    y: torch.Tensor,
    info: SlotBatchInfo,
    slice_offsets: tuple[int, ...],
) -> None:
    """Reference expand from every slot's shrink (the stacked base GEMM's extra columns).

    Semantics: `sgmv_expand` with segment i reading
    `v_all[:, slot[i] * num_slices * R:(slot[i] + 1) * num_slices * R]` as its v.

    Args:
        v_all: [num_tokens, num_slots * num_slices * max_rank]; may be a strided view.
        b_stack, y, info, slice_offsets: as in `sgmv_expand`.
    """
    num_slots, _, max_rank = b_stack.shape
    num_slices = len(slice_offsets) - 1
    assert v_all.shape[1] == num_slots * num_slices * max_rank, (
        "v_all width must be num_slots * num_slices * max_rank"
    )
    _expand(v_all, b_stack, y, info, slice_offsets, slot_cols=num_slices * max_rank)


def _expand(
    v: torch.Tensor,
    b_stack: torch.Tensor,
    y: torch.Tensor,
    info: SlotBatchInfo,
    slice_offsets: tuple[int, ...],
    *,
    slot_cols: int,
) -> None:
    num_slices = len(slice_offsets) - 1
    max_rank = b_stack.shape[2]
    scaling = info.slot_scaling.tolist()
    for start, end, slot, rank in active_segments(info):
        base = slot * slot_cols  # 0 for a compact v
        for j in range(num_slices):
            lo, hi = slice_offsets[j], slice_offsets[j + 1]
            col = base + j * max_rank
            v_seg = v[start:end, col : col + rank].float()  # [len, rank]
            b = b_stack[slot, lo:hi, :rank].float()  # [out_j, rank]
            # In-place add of a float32 tensor computes in float32: one rounding into y.dtype.
            y[start:end, lo:hi].add_(v_seg @ b.T, alpha=scaling[slot])


def lora_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    info: SlotBatchInfo,
    slice_offsets: tuple[int, ...],
) -> None:
    """Reference LoRA delta: `y += expand(shrink(x))`, the call the model's linear layers make.

    Args:
        x: [num_tokens, in_features]; y: [num_tokens, out_total], updated in place.
        a_stack: [num_slots, num_slices * max_rank, in_features].
        b_stack: [num_slots, out_total, max_rank].
        info: segment table; slice_offsets: num_slices + 1 host ints.
    """
    v = sgmv_shrink(x, a_stack, info, len(slice_offsets) - 1)
    sgmv_expand(v, b_stack, y, info, slice_offsets)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference RMSNorm (HF's LlamaRMSNorm): normalize in float32, round to x.dtype, scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference rotary embedding: x `[tokens, heads, head_dim]`, cos/sin `[tokens, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
