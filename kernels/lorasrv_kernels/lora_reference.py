"""Plain-torch LoRA ops over arena rows: the specification the Triton row kernels are tested
against, and the `torch` backend on CPU. Same names and signatures as the Triton ops
(`lorasrv_kernels.lora_shrink` ...), so a backend can hold either set.

Row layout (one arena row = one rank index of one adapter; see `batch_info.LoraBatchInfo`):
`a_rows[p, j*in:(j+1)*in]` is row i of slice j's A, `bt_rows[p, off_j:off_{j+1}]` is column i
of slice j's B, for p = `row_index[row_start[s] + i]`. The rank-r intermediate v is float32
(PEFT runs the adapter path in float32); each output is rounded into its dtype once.
Vectorized per segment (a Python loop over a step's few segments and slices, never over tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .batch_info import COUNT_SEGMENTS, LoraBatchInfo


class _Segment(NamedTuple):
    start: int
    end: int
    rows: torch.Tensor  # [rank] int64 arena rows
    scaling: float
    v_col: int  # where its rank columns start in a stacked v (the `*_cols` ops)


def active_segments(info: LoraBatchInfo) -> list[_Segment]:
    """Segments with a rank and at least one token (one device sync)."""
    num_segments = int(info.counts[COUNT_SEGMENTS])
    indptr = info.seg_indptr[: num_segments + 1].tolist()
    ranks = info.seg_rank[:num_segments].tolist()
    starts = info.seg_row_start[:num_segments].tolist()
    scaling = info.seg_scaling[:num_segments].tolist()
    v_cols = info.seg_v_col[:num_segments].tolist()
    segments = []
    for seg in range(num_segments):
        if ranks[seg] == 0 or indptr[seg + 1] <= indptr[seg]:
            continue
        rows = info.row_index[starts[seg] : starts[seg] + ranks[seg]].long()
        segments.append(_Segment(indptr[seg], indptr[seg + 1], rows, scaling[seg], v_cols[seg]))
    return segments


def lora_shrink(
    x: torch.Tensor, a_rows: torch.Tensor, info: LoraBatchInfo, num_slices: int
) -> torch.Tensor:
    """Reference shrink.

    Semantics: `v[t, j*R + i] = x[t] . a_rows[row_index[row_start[s] + i], j*in:(j+1)*in]` for
    token t of segment s, slice j, i < rank[s] (R = info.max_rank); other entries are 0 here
    (the Triton shrink leaves them unset).

    Args:
        x: [num_tokens, in_features], float32/float16/bfloat16.
        a_rows: [max_rows, num_slices * in_features], x.dtype, any row stride.
        info: the step's segments; num_slices: 1 (o/down), 2 (gate/up) or 3 (q/k/v).

    Returns:
        v: [num_tokens, num_slices * max_rank] float32.
    """
    num_tokens, in_features = x.shape
    assert a_rows.shape[1] == num_slices * in_features, "a_rows must be [rows, slices * in]"
    v = x.new_zeros(num_tokens, num_slices, info.max_rank, dtype=torch.float32)
    for seg in active_segments(info):
        a = a_rows[seg.rows].float().view(-1, num_slices, in_features)  # [rank, slices, in]
        rank = a.shape[0]
        v[seg.start : seg.end, :, :rank] = torch.einsum(
            "tk,rnk->tnr", x[seg.start : seg.end].float(), a
        )
    return v.view(num_tokens, num_slices * info.max_rank)


def lora_expand(
    v: torch.Tensor,
    bt_rows: torch.Tensor,
    y: torch.Tensor,
    info: LoraBatchInfo,
    slice_offsets: tuple[int, ...],
) -> None:
    """Reference expand, in place.

    Semantics: `y[t, off_j:off_{j+1}] += scaling[s] * sum_i v[t, j*R + i] *
    bt_rows[row_index[row_start[s] + i], off_j:off_{j+1}]` for token t of segment s, i < rank[s];
    summed in float32 and rounded into y.dtype once. Rows of base segments are untouched.

    Args:
        v: [num_tokens, num_slices * max_rank] float32 (the shrink's output).
        bt_rows: [max_rows, out_total], float32/float16/bfloat16, any row stride.
        y: [num_tokens, out_total], updated in place (may be a strided view).
        slice_offsets: num_slices + 1 host ints, the last == out_total.
    """
    num_slices = len(slice_offsets) - 1
    assert v.shape[1] == num_slices * info.max_rank, "v must be [tokens, slices * max_rank]"
    _expand(v, bt_rows, y, info, slice_offsets, info.max_rank, stacked=False)


def lora_expand_cols(
    v: torch.Tensor,
    bt_rows: torch.Tensor,
    y: torch.Tensor,
    info: LoraBatchInfo,
    slice_offsets: tuple[int, ...],
    slice_stride: int,
) -> None:
    """Reference expand of a stacked v, in place: segment s reads its rank columns at
    `seg_v_col[s] + j * slice_stride` (a `[W; A_hot]` GEMM's shrink columns).

    Semantics: `y[t, off_j:off_{j+1}] += scaling[s] * sum_i v[t, seg_v_col[s] + j*slice_stride
    + i] * bt_rows[row_index[row_start[s] + i], off_j:off_{j+1}]`, i < rank[s]; float32 sums,
    one rounding into y.dtype. Other columns of v are never read.

    Args:
        v: [num_tokens, >= num_slices * slice_stride], float32 or bt_rows.dtype, any strides.
        Others as `lora_expand`.
    """
    assert v.shape[1] >= (len(slice_offsets) - 1) * slice_stride, "v too narrow"
    _expand(v, bt_rows, y, info, slice_offsets, slice_stride, stacked=True)


def _expand(
    v: torch.Tensor,
    bt_rows: torch.Tensor,
    y: torch.Tensor,
    info: LoraBatchInfo,
    slice_offsets: tuple[int, ...],
    slice_stride: int,
    *,
    stacked: bool,
) -> None:
    for seg in active_segments(info):
        b = bt_rows[seg.rows].float()  # [rank, out_total]
        rank = b.shape[0]
        for j in range(len(slice_offsets) - 1):
            lo, hi = slice_offsets[j], slice_offsets[j + 1]
            col = j * slice_stride + (seg.v_col if stacked else 0)
            v_seg = v[seg.start : seg.end, col : col + rank].float()
            # In-place add of a float32 tensor computes in float32: one rounding into y.dtype.
            y[seg.start : seg.end, lo:hi].add_(v_seg @ b[:, lo:hi], alpha=seg.scaling)


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    a_rows: torch.Tensor,
    bt_rows: torch.Tensor,
    info: LoraBatchInfo,
    slice_offsets: tuple[int, ...],
) -> None:
    """Reference LoRA delta of one fused linear: `y += expand(shrink(x))`.

    Args:
        x: [num_tokens, in_features]; y: [num_tokens, out_total], updated in place.
        a_rows: [max_rows, num_slices * in_features]; bt_rows: [max_rows, out_total].
        info: the step's segments; slice_offsets: num_slices + 1 host ints.
    """
    v = lora_shrink(x, a_rows, info, len(slice_offsets) - 1)
    lora_expand(v, bt_rows, y, info, slice_offsets)


def lora_silu_mul(
    gate_up: torch.Tensor, v: torch.Tensor, bt_rows: torch.Tensor, info: LoraBatchInfo
) -> torch.Tensor:
    """Reference gated activation with the gate/up LoRA delta added first.

    Semantics: `silu(g) * u` with `g, u = y.chunk(2, -1)`, `y = gate_up` after
    `lora_expand(v, bt_rows, y, info, (0, n, 2n))`; each op rounded to gate_up.dtype as torch
    does. gate_up itself is not modified.

    Args:
        gate_up: [num_tokens, 2 * n], the base GEMM's gate then up columns.
        v: [num_tokens, 2 * max_rank] float32, gate/up's shrink.
        bt_rows: [max_rows, 2 * n].

    Returns:
        [num_tokens, n] in gate_up.dtype (the Triton op leaves rows outside every segment unset).
    """
    num_cols = gate_up.shape[1] // 2
    y = gate_up.clone()
    lora_expand(v, bt_rows, y, info, (0, num_cols, 2 * num_cols))
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


def lora_silu_mul_cols(
    gate_up: torch.Tensor,
    v: torch.Tensor,
    bt_rows: torch.Tensor,
    info: LoraBatchInfo,
    slice_stride: int,
) -> torch.Tensor:
    """Reference gated activation with gate/up's delta from a stacked v: `silu(g) * u` of
    `gate_up` after `lora_expand_cols(v, bt_rows, y, info, (0, n, 2n), slice_stride)`.

    Returns:
        [num_tokens, n] in gate_up.dtype; gate_up itself is not modified.
    """
    num_cols = gate_up.shape[1] // 2
    y = gate_up.clone()
    lora_expand_cols(v, bt_rows, y, info, (0, num_cols, 2 * num_cols), slice_stride)
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up
