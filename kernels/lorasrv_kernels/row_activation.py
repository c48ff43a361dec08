"""The gated MLP's `silu(gate) * up` with each segment's gate/up LoRA delta (arena rows) added on
the way: the gate/up expand and the activation in one launch, over the step's token tiles.

Owns the kernel and its typed launcher; rounding follows the reference step by step; never
imports lorasrv.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .batch_info import COUNT_TOKEN_TILES, LoraBatchInfo
from .row_expand import dot_flags, rank_dot
from .row_shrink import num_sms

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"

_TOKEN_TILES = tl.constexpr(COUNT_TOKEN_TILES)  # where `counts` holds all token tiles


class ActConfig(NamedTuple):
    """Launch parameters. Measured in CUDA graphs on an H100 (bench/lora_layer.py, Llama-3-8B
    gate/up): 128 columns per program, 76 against 105 us with 64 at 64 tokens over 64 adapters
    of ranks 8-64, 10.3 against 13.2 us at 64 tokens over 8 adapters of rank 16. NOTE: the
    separate `lora_expand` + `silu_mul` measured 64 + ~3 us there (faster from many adapters on;
    slower at 8 adapters by ~1 us), so this kernel pays only with few adapters."""

    block_n: int = 128
    block_r: int = 16
    programs_per_sm: int = 8
    num_programs: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    # False rounds v to B's dtype before one dot (the slot path's precision), for measuring
    # what the float32 intermediate costs.
    exact_v: bool = True


@triton.jit
def _lora_silu_mul_kernel(
    # pointers
    gate_up_ptr,  # [num_tokens, 2 * num_cols]: the base GEMM's gate, then up columns
    v_ptr,  # [num_tokens, >= 2 * v_slice] float32 or 16-bit: gate's shrink, then up's
    bt_ptr,  # [max_rows, 2 * num_cols], arena rows (any row stride)
    out_ptr,  # [num_tokens, num_cols]
    seg_indptr_ptr,  # [max_segments + 1] int32
    seg_rank_ptr,  # [max_segments] int32
    seg_row_start_ptr,  # [max_segments] int32
    seg_scaling_ptr,  # [max_segments] float32
    seg_v_col_ptr,  # [max_segments] int32: the segment's first v column (read when V_COL)
    row_index_ptr,  # [max_row_entries] int32
    tiles_ptr,  # [max_token_tiles, 2] int32: (segment, first token)
    counts_ptr,  # [4] int32
    # sizes
    num_cols,
    v_slice,  # v columns from gate's rank block to up's (max_rank for lora_silu_mul)
    # strides
    stride_gt,
    stride_vt,
    stride_br,
    stride_ot,
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
    num_col_blocks = tl.cdiv(num_cols, BLOCK_N)
    # Base segments' tiles too: every row needs its activation.
    num_work = tl.load(counts_ptr + _TOKEN_TILES) * num_col_blocks
    offs_tm = tl.arange(0, BLOCK_M)
    offs_tr = tl.arange(0, BLOCK_R)
    dtype = out_ptr.dtype.element_ty
    for w in range(pid, num_work, num_programs):
        tile = w // num_col_blocks
        seg = tl.load(tiles_ptr + tile * 2)
        offs_m = tl.load(tiles_ptr + tile * 2 + 1) + offs_tm
        offs_n = (w % num_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < tl.load(seg_indptr_ptr + seg + 1)
        mask_n = offs_n < num_cols
        mask = mask_m[:, None] & mask_n[None, :]
        g_ptrs = gate_up_ptr + offs_m.to(tl.int64)[:, None] * stride_gt + offs_n[None, :]
        gate = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_N]
        up = tl.load(g_ptrs + num_cols, mask=mask, other=0.0).to(tl.float32)
        rank = tl.load(seg_rank_ptr + seg)
        row_index = row_index_ptr + tl.load(seg_row_start_ptr + seg)
        v_row = v_ptr + offs_m.to(tl.int64)[:, None] * stride_vt
        if V_COL:  # a stacked v: the segment's rank block where its adapter's A rows sit
            v_row += tl.load(seg_v_col_ptr + seg)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):  # no iteration for base rows
            mask_r = (r0 + offs_tr) < rank
            rows = tl.load(row_index + r0 + offs_tr, mask=mask_r, other=0)
            mask_v = mask_m[:, None] & mask_r[None, :]
            v_g = tl.load(v_row + (r0 + offs_tr)[None, :], mask=mask_v, other=0.0)
            v_u = tl.load(v_row + (v_slice + r0 + offs_tr)[None, :], mask=mask_v, other=0.0)
            mask_b = mask_r[:, None] & mask_n[None, :]
            b_ptrs = bt_ptr + rows.to(tl.int64)[:, None] * stride_br + offs_n[None, :]
            b_g = tl.load(b_ptrs, mask=mask_b, other=0.0)  # [BLOCK_R, BLOCK_N]
            b_u = tl.load(b_ptrs + num_cols, mask=mask_b, other=0.0)
            acc_g = rank_dot(acc_g, v_g, b_g, SPLIT_V, DOT_PRECISION)
            acc_u = rank_dot(acc_u, v_u, b_u, SPLIT_V, DOT_PRECISION)
        # Base segments add exactly 0 (their scaling entry may hold anything).
        scaling = tl.where(rank > 0, tl.load(seg_scaling_ptr + seg), 0.0)
        # The expand's one rounding of `y + delta` into the dtype, then the activation's.
        gate = (gate + acc_g * scaling).to(dtype).to(tl.float32)
        up = (up + acc_u * scaling).to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
        tl.store(out_ptrs, (act * up).to(dtype), mask=mask)


def lora_silu_mul(
    gate_up: torch.Tensor,
    v: torch.Tensor,
    bt_rows: torch.Tensor,
    info: LoraBatchInfo,
    *,
    config: ActConfig | None = None,
) -> torch.Tensor:
    """`silu(g) * u` of the gate/up output with each segment's LoRA delta added first, one
    launch (no host sync: capturable); replaces the gate/up expand and `silu_mul`.

    Semantics: `silu_mul(y)` where `y = gate_up` after `lora_expand(v, bt_rows, y, info,
    (0, n, 2n))`, with the same roundings, without writing y.

    Args:
        gate_up: [num_tokens, 2 * n], the base GEMM's output (strided rows, contiguous columns).
        v: [num_tokens, 2 * max_rank] float32, gate/up's `lora_shrink`.
        bt_rows: [max_rows, 2 * n], gate_up.dtype; contiguous columns, any row stride.
        info: segments covering every row whose activation is needed (base rows: rank 0).
        config: launch parameters (sweeps); None = the tuned defaults.

    Returns:
        [num_tokens, n] in gate_up.dtype, contiguous; rows outside every segment unset.
    """
    assert v.shape == (gate_up.shape[0], 2 * info.max_rank), "v: [tokens, 2 * max_rank]"
    assert v.dtype == torch.float32, "v: the shrink's float32 output"
    return _launch(gate_up, v, bt_rows, info, config, v_slice=info.max_rank, v_col=False)


def lora_silu_mul_cols(
    gate_up: torch.Tensor,
    v: torch.Tensor,
    bt_rows: torch.Tensor,
    info: LoraBatchInfo,
    slice_stride: int,
    *,
    config: ActConfig | None = None,
) -> torch.Tensor:
    """`lora_silu_mul` reading each segment's v at its own columns (a stacked `[W; A_hot]`
    GEMM's shrink columns, as `lora_expand_cols`).

    Semantics: `silu_mul(y)` where `y = gate_up` after `lora_expand_cols(v, bt_rows, y, info,
    (0, n, 2n), slice_stride)`, with the same roundings, without writing y.

    Args:
        v: [num_tokens, >= 2 * slice_stride], float32 or gate_up.dtype, contiguous columns;
            gate's rank block of segment s at `seg_v_col[s]`, up's `slice_stride` further.
        Others as `lora_silu_mul`.
    """
    assert v.shape[0] == gate_up.shape[0], "v and gate_up: one row per token"
    assert v.shape[1] >= 2 * slice_stride, "v: [tokens, >= 2 * slice_stride]"
    assert v.dtype in (torch.float32, gate_up.dtype), "v: float32 or gate_up's dtype"
    return _launch(gate_up, v, bt_rows, info, config, v_slice=slice_stride, v_col=True)


def _launch(
    gate_up: torch.Tensor,
    v: torch.Tensor,
    bt_rows: torch.Tensor,
    info: LoraBatchInfo,
    config: ActConfig | None,
    *,
    v_slice: int,
    v_col: bool,
) -> torch.Tensor:
    cfg = config or ActConfig()
    num_tokens, width = gate_up.shape
    assert width % 2 == 0, "gate_up must hold gate and up halves"
    assert bt_rows.shape[1] == width, "bt_rows must have gate_up's width"
    assert gate_up.stride(1) == 1, "gate_up: columns must be contiguous"
    assert bt_rows.stride(1) == 1, "bt_rows: columns must be contiguous"
    assert v.stride(1) == 1, "v: columns must be contiguous"
    assert gate_up.dtype == bt_rows.dtype, "one dtype for gate_up and B"
    num_cols = width // 2
    out = torch.empty(num_tokens, num_cols, dtype=gate_up.dtype, device=gate_up.device)
    max_work = info.max_token_tiles * triton.cdiv(num_cols, cfg.block_n)
    if max_work == 0 or num_tokens == 0:
        return out
    num_programs = cfg.num_programs or cfg.programs_per_sm * num_sms(gate_up.device)
    split_v, precision = dot_flags(bt_rows.dtype, v.dtype)
    split_v = split_v and cfg.exact_v
    _lora_silu_mul_kernel[(min(num_programs, max_work),)](
        gate_up, v, bt_rows, out,
        info.seg_indptr, info.seg_rank, info.seg_row_start, info.seg_scaling, info.seg_v_col,
        info.row_index, info.token_tiles, info.counts,
        num_cols, v_slice,
        gate_up.stride(0), v.stride(0), bt_rows.stride(0), out.stride(0),
        BLOCK_M=info.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
        SPLIT_V=split_v, DOT_PRECISION=precision, V_COL=v_col,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
