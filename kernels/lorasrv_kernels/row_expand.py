"""Row-gather SGMV expand: `y += scaling * v @ B` per segment and slice over the adapter's arena
rows, in one launch whose fixed grid walks the step's token tiles (CUDA-graph safe).

Owns the kernel, its typed launcher and the float32-v dot both expand kernels share; never
imports lorasrv.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .batch_info import COUNT_LORA_TILES, LoraBatchInfo
from .row_shrink import num_sms

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"

_LORA_TILES = tl.constexpr(COUNT_LORA_TILES)  # where `counts` holds the LoRA token tiles
# Slice column ranges travel as scalar arguments (q/k/v is the widest fusion the model has).
MAX_SLICES = 3


class ExpandConfig(NamedTuple):
    """Launch parameters. Measured in CUDA graphs on an H100 (bench/lora_layer.py, Llama-3-8B,
    64 and 256 tokens over 64 adapters of ranks 8-64, 64 tokens over 8 of rank 16): these
    defaults were fastest or within 1.2 us of the fastest for every module; rank steps of 32/64
    cost 20-100% more (wasted MMA and registers for rank-8/16 adapters), 64-column blocks ~35%.
    The float32 v (two dots, `exact_v`) cost 0.1-0.6 us per module against v rounded to bf16.
    """

    block_n: int = 128
    block_r: int = 16  # rank step of the inner loop
    programs_per_sm: int = 8  # fixed grid: programs_per_sm * SMs (or num_programs)
    num_programs: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    # False rounds v to B's dtype before one dot (the slot path's precision), for measuring
    # what the float32 intermediate costs.
    exact_v: bool = True


@triton.jit
def rank_dot(acc, v_tile, b_tile, SPLIT_V: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`acc + v_tile @ b_tile` with v float32 and b 16-bit: v is split into a 16-bit high and a
    16-bit low part, so the float32 intermediate keeps ~16 bits instead of 8 (B is exact)."""
    if SPLIT_V:
        hi = v_tile.to(b_tile.dtype)
        lo = (v_tile - hi.to(tl.float32)).to(b_tile.dtype)
        acc = tl.dot(hi, b_tile, acc)
        acc = tl.dot(lo, b_tile, acc)
    elif b_tile.dtype == tl.float32:
        acc = tl.dot(v_tile, b_tile, acc, input_precision=DOT_PRECISION)
    else:  # v rounded to B's dtype (ExpandConfig.exact_v=False: measurement only)
        acc = tl.dot(v_tile.to(b_tile.dtype), b_tile, acc)
    return acc


@triton.jit
def _lora_expand_kernel(
    # pointers
    v_ptr,  # [num_tokens, num_slices * max_rank] float32
    bt_ptr,  # [max_rows, out_total], arena rows (any row stride)
    y_ptr,  # [num_tokens, out_total], updated in place
    seg_indptr_ptr,  # [max_segments + 1] int32
    seg_rank_ptr,  # [max_segments] int32
    seg_row_start_ptr,  # [max_segments] int32
    seg_scaling_ptr,  # [max_segments] float32
    seg_v_col_ptr,  # [max_segments] int32: the segment's first v column (read when V_COL)
    row_index_ptr,  # [max_row_entries] int32
    tiles_ptr,  # [max_token_tiles, 2] int32: (segment, first token), LoRA tiles first
    counts_ptr,  # [4] int32
    # sizes
    v_slice,  # v columns from one slice's rank block to the next (max_rank for lora_expand)
    slice_off0,
    slice_off1,
    slice_off2,
    slice_off3,
    # strides
    stride_vt,
    stride_vr,
    stride_br,
    stride_bn,
    stride_yt,
    stride_yn,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_V: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    V_COL: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    # Column blocks never cross a slice boundary: each slice reads its own rank columns of v.
    nb0 = tl.cdiv(slice_off1 - slice_off0, BLOCK_N)
    nb1 = tl.cdiv(slice_off2 - slice_off1, BLOCK_N)
    num_col_blocks = nb0 + nb1 + tl.cdiv(slice_off3 - slice_off2, BLOCK_N)
    num_work = tl.load(counts_ptr + _LORA_TILES) * num_col_blocks
    offs_tm = tl.arange(0, BLOCK_M)
    offs_tn = tl.arange(0, BLOCK_N)
    offs_tr = tl.arange(0, BLOCK_R)
    for w in range(pid, num_work, num_programs):
        # NOTE: adjacent work items are adjacent column blocks of one token tile: one v tile,
        # and consecutive bytes of each arena row's B part.
        tile = w // num_col_blocks
        col_block = w % num_col_blocks
        slice_idx = (col_block >= nb0).to(tl.int32) + (col_block >= nb0 + nb1).to(tl.int32)
        first_block = tl.where(slice_idx == 0, 0, tl.where(slice_idx == 1, nb0, nb0 + nb1))
        col_lo = tl.where(slice_idx == 0, slice_off0,
                          tl.where(slice_idx == 1, slice_off1, slice_off2))  # fmt: skip
        col_hi = tl.where(slice_idx == 0, slice_off1,
                          tl.where(slice_idx == 1, slice_off2, slice_off3))  # fmt: skip
        seg = tl.load(tiles_ptr + tile * 2)
        offs_m = tl.load(tiles_ptr + tile * 2 + 1) + offs_tm
        offs_n = col_lo + (col_block - first_block) * BLOCK_N + offs_tn
        mask_m = offs_m < tl.load(seg_indptr_ptr + seg + 1)
        mask_n = offs_n < col_hi
        rank = tl.load(seg_rank_ptr + seg)
        row_index = row_index_ptr + tl.load(seg_row_start_ptr + seg)
        v_col = slice_idx * v_slice
        if V_COL:  # a stacked v: each segment's rank block where its adapter's A rows sit
            v_col += tl.load(seg_v_col_ptr + seg)
        v_ptrs = (
            v_ptr
            + offs_m.to(tl.int64)[:, None] * stride_vt
            + (v_col + offs_tr)[None, :] * stride_vr
        )  # [BLOCK_M, BLOCK_R]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            mask_r = (r0 + offs_tr) < rank
            rows = tl.load(row_index + r0 + offs_tr, mask=mask_r, other=0)
            v_tile = tl.load(v_ptrs + r0 * stride_vr, mask=mask_m[:, None] & mask_r[None, :],
                             other=0.0)  # fmt: skip
            # [BLOCK_R, BLOCK_N]: one contiguous run of each arena row's B part. Masked rank
            # rows are never read, so stale arena bytes (NaN included) cannot leak.
            b_ptrs = bt_ptr + rows.to(tl.int64)[:, None] * stride_br + offs_n[None, :] * stride_bn
            b_tile = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            acc = rank_dot(acc, v_tile, b_tile, SPLIT_V, DOT_PRECISION)
        scaling = tl.load(seg_scaling_ptr + seg)
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_yt + offs_n[None, :] * stride_yn
        mask_y = mask_m[:, None] & mask_n[None, :]
        y_tile = tl.load(y_ptrs, mask=mask_y, other=0.0).to(tl.float32)
        # One rounding into y.dtype, as in the reference.
        tl.store(y_ptrs, (y_tile + acc * scaling).to(y_ptr.dtype.element_ty), mask=mask_y)


def dot_flags(dtype: torch.dtype, v_dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """(SPLIT_V, DOT_PRECISION) for B of this dtype: a float32 v against 16-bit B is split into
    two 16-bit parts; float32 runs in IEEE precision (exact in the interpreter and on the GPU
    alike); a 16-bit v (a stacked GEMM's output) takes one dot."""
    split = dtype != torch.float32 and v_dtype == torch.float32
    return split, "ieee" if dtype == torch.float32 else "tf32"


def lora_expand(
    v: torch.Tensor,
    bt_rows: torch.Tensor,
    y: torch.Tensor,
    info: LoraBatchInfo,
    slice_offsets: tuple[int, ...],
    *,
    config: ExpandConfig | None = None,
) -> None:
    """Triton expand over arena rows, in place, one launch (no host sync: capturable).

    Semantics: `y[t, off_j:off_{j+1}] += scaling[s] * sum_i v[t, j*R + i] *
    bt_rows[row_index[row_start[s] + i], off_j:off_{j+1}]` for token t of segment s, i < rank[s]
    (R = info.max_rank); summed in float32, rounded into y.dtype once. Base rows are untouched.

    Args:
        v: [num_tokens, num_slices * max_rank] float32 (the shrink's output).
        bt_rows: [max_rows, out_total], float32/float16/bfloat16; any row stride.
        y: [num_tokens, out_total], any float dtype, may be a strided view; updated in place.
        info: the step's segments on y.device.
        slice_offsets: num_slices + 1 host ints (num_slices <= 3), the last == out_total.
        config: launch parameters (sweeps); None = the tuned defaults.
    """
    num_slices = len(slice_offsets) - 1
    assert v.shape == (y.shape[0], num_slices * info.max_rank), "v: [tokens, slices * max_rank]"
    assert v.dtype == torch.float32, "v must be the shrink's float32 output"
    _launch(v, bt_rows, y, info, slice_offsets, config, v_slice=info.max_rank, v_col=False)


def lora_expand_cols(
    v: torch.Tensor,
    bt_rows: torch.Tensor,
    y: torch.Tensor,
    info: LoraBatchInfo,
    slice_offsets: tuple[int, ...],
    slice_stride: int,
    *,
    config: ExpandConfig | None = None,
) -> None:
    """`lora_expand` reading each segment's v at its own columns: the expand of a stacked
    `[W; A_hot]` GEMM, whose shrink columns hold a few adapters' A rows side by side.

    Semantics: `y[t, off_j:off_{j+1}] += scaling[s] * sum_i v[t, seg_v_col[s] + j*slice_stride
    + i] * bt_rows[row_index[row_start[s] + i], off_j:off_{j+1}]` for token t of segment s,
    i < rank[s]; float32 sums, one rounding into y.dtype. Columns no segment names are never
    read (NaN there cannot leak).

    Args:
        v: [num_tokens, >= num_slices * slice_stride], float32 or bt_rows.dtype; any strides
            (a column window of the GEMM output).
        slice_stride: v columns from slice j's block to slice j+1's (the hot rows per slice).
        Others as `lora_expand`.
    """
    num_slices = len(slice_offsets) - 1
    assert v.shape[0] == y.shape[0], "v and y: one row per token"
    assert v.shape[1] >= num_slices * slice_stride, "v: [tokens, >= slices * slice_stride]"
    assert v.dtype in (torch.float32, bt_rows.dtype), "v: float32 or B's dtype"
    _launch(v, bt_rows, y, info, slice_offsets, config, v_slice=slice_stride, v_col=True)


def _launch(
    v: torch.Tensor,
    bt_rows: torch.Tensor,
    y: torch.Tensor,
    info: LoraBatchInfo,
    slice_offsets: tuple[int, ...],
    config: ExpandConfig | None,
    *,
    v_slice: int,
    v_col: bool,
) -> None:
    cfg = config or ExpandConfig()
    num_slices = len(slice_offsets) - 1
    assert 1 <= num_slices <= MAX_SLICES, f"1..{MAX_SLICES} slices supported"
    num_tokens, out_total = y.shape
    assert bt_rows.shape[1] == out_total == slice_offsets[-1], "bt_rows, y and slices disagree"
    assert all(a <= b for a, b in itertools.pairwise(slice_offsets)), "slices out of order"
    num_col_blocks = sum(triton.cdiv(slice_offsets[j + 1] - slice_offsets[j], cfg.block_n)
                         for j in range(num_slices))  # fmt: skip
    max_work = info.max_lora_tiles * num_col_blocks
    if max_work == 0 or num_tokens == 0:
        return
    num_programs = cfg.num_programs or cfg.programs_per_sm * num_sms(y.device)
    offs = list(slice_offsets) + [slice_offsets[-1]] * (MAX_SLICES + 1 - len(slice_offsets))
    split_v, precision = dot_flags(bt_rows.dtype, v.dtype)
    split_v = split_v and cfg.exact_v
    _lora_expand_kernel[(min(num_programs, max_work),)](
        v, bt_rows, y,
        info.seg_indptr, info.seg_rank, info.seg_row_start, info.seg_scaling, info.seg_v_col,
        info.row_index, info.token_tiles, info.counts,
        v_slice, offs[0], offs[1], offs[2], offs[3],
        v.stride(0), v.stride(1), bt_rows.stride(0), bt_rows.stride(1),
        y.stride(0), y.stride(1),
        BLOCK_M=info.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
        SPLIT_V=split_v, DOT_PRECISION=precision, V_COL=v_col,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
