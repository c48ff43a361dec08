"""Row-gather SGMV shrink: `v = x @ A.T` per segment over the adapter's arena rows, every slice,
rank and segment in one launch whose fixed grid walks the step's tile list (CUDA-graph safe).

Owns the kernel and its typed launcher; builds no batch metadata and never imports lorasrv.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .batch_info import COUNT_SHRINK_TILES, NUM_COUNTERS, SHRINK_BLOCK_R, LoraBatchInfo

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"

_SHRINK_TILES = tl.constexpr(COUNT_SHRINK_TILES)  # where `counts` holds the tile count


class ShrinkConfig(NamedTuple):
    """Launch parameters. Measured in CUDA graphs on an H100 (bench/lora_layer.py, Llama-3-8B,
    64 and 256 tokens over 64 adapters of ranks 8-64, 64 tokens over 8 of rank 16): these
    defaults were fastest or within 1 us of the fastest for every module. Splitting K matters:
    down_proj 31 us against 50 without it at 64 adapters, 8 against 40 at 8 adapters.
    """

    block_k: int = 128
    # Fixed grid: programs_per_sm * SMs (or num_programs). A step's (tile, slice) units are
    # split along K while units * splits fits the grid, so few segments still fill the GPU.
    programs_per_sm: int = 4
    num_programs: int | None = None
    max_split: int = 16
    min_k_chunks: int = 2  # block_k chunks per split, at least
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _lora_shrink_kernel(
    # pointers
    x_ptr,  # [num_tokens, in_features]
    a_ptr,  # [max_rows, num_slices * in_features], arena rows (any row stride)
    v_ptr,  # [num_tokens, num_slices * max_rank] float32
    partial_ptr,  # [num_programs, BLOCK_M, BLOCK_R] float32, split-K partials
    counter_ptr,  # [NUM_COUNTERS] int32, zero between launches
    seg_indptr_ptr,  # [max_segments + 1] int32
    seg_rank_ptr,  # [max_segments] int32
    seg_row_start_ptr,  # [max_segments] int32
    row_index_ptr,  # [max_row_entries] int32
    tiles_ptr,  # [max_shrink_tiles, 3] int32: (segment, first token, first rank)
    counts_ptr,  # [4] int32
    # sizes
    in_features,
    max_rank,
    num_slices,
    split_cap,
    # strides
    stride_xt,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_vt,
    stride_vr,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_units = tl.load(counts_ptr + _SHRINK_TILES) * num_slices  # (tile, slice) pairs
    # Split K only as far as the fixed grid has room: the step's exact work decides, not the
    # bucket's bound (the consumer of v never sees the split: it is summed here).
    split = tl.minimum(tl.maximum(num_programs // tl.maximum(num_units, 1), 1), split_cap)
    chunks_per_split = tl.cdiv(tl.cdiv(in_features, BLOCK_K), split)
    offs_tm = tl.arange(0, BLOCK_M)
    offs_tr = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    for w in range(pid, num_units * split, num_programs):
        # NOTE: the splits of one unit are adjacent work items: they stream one A block.
        unit = w // split
        k_split = w % split
        tile = unit // num_slices
        slice_idx = unit % num_slices
        seg = tl.load(tiles_ptr + tile * 3)
        offs_m = tl.load(tiles_ptr + tile * 3 + 1) + offs_tm
        offs_r = tl.load(tiles_ptr + tile * 3 + 2) + offs_tr
        mask_m = offs_m < tl.load(seg_indptr_ptr + seg + 1)
        # Rank indices past the segment's rank are masked: their rows are never read.
        mask_r = offs_r < tl.load(seg_rank_ptr + seg)
        rows = tl.load(row_index_ptr + tl.load(seg_row_start_ptr + seg) + offs_r, mask=mask_r,
                       other=0)  # fmt: skip
        k_lo = k_split * chunks_per_split * BLOCK_K
        k_hi = tl.minimum(k_lo + chunks_per_split * BLOCK_K, in_features)
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xt + offs_k[None, :] * stride_xk
        a_ptrs = (
            a_ptr
            + rows.to(tl.int64)[None, :] * stride_ar
            + (slice_idx * in_features + offs_k)[:, None] * stride_ak
        )  # [BLOCK_K, BLOCK_R]: a gathered A^T tile, each row's K run contiguous
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            mask_k = (k0 + offs_k) < k_hi
            x_tile = tl.load(x_ptrs + k0 * stride_xk, mask=mask_m[:, None] & mask_k[None, :],
                             other=0.0)  # fmt: skip
            a_tile = tl.load(a_ptrs + k0 * stride_ak, mask=mask_k[:, None] & mask_r[None, :],
                             other=0.0)  # fmt: skip
            acc += tl.dot(x_tile, a_tile, input_precision=DOT_PRECISION)
        v_ptrs = (
            v_ptr
            + offs_m.to(tl.int64)[:, None] * stride_vt
            + (slice_idx * max_rank + offs_r)[None, :] * stride_vr
        )
        mask_v = mask_m[:, None] & mask_r[None, :]
        if split == 1:
            tl.store(v_ptrs, acc, mask=mask_v)
        else:
            # Each split stores its partial; the last to arrive sums all of them in split
            # order (deterministic, no float atomics) and re-arms the counter.
            tile_offs = offs_tm[:, None] * BLOCK_R + offs_tr[None, :]
            tl.store(partial_ptr + w * (BLOCK_M * BLOCK_R) + tile_offs, acc)
            # NOTE: the barrier orders every thread's partial before the release below.
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + unit, 1, sem="acq_rel", scope="gpu")
            if arrived == split - 1:
                total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for part in range(0, split):
                    part_ptrs = partial_ptr + (unit * split + part) * (BLOCK_M * BLOCK_R)
                    # .cg: straight from L2, where the other programs' partials landed.
                    total += tl.load(part_ptrs + tile_offs, cache_modifier=".cg")
                tl.store(v_ptrs, total, mask=mask_v)
                tl.atomic_xchg(counter_ptr + unit, 0)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the CPU interpreter."""
    if device.type != "cuda":
        return 4
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def lora_shrink(
    x: torch.Tensor,
    a_rows: torch.Tensor,
    info: LoraBatchInfo,
    num_slices: int,
    *,
    out: torch.Tensor | None = None,
    config: ShrinkConfig | None = None,
) -> torch.Tensor:
    """Triton shrink over arena rows, one launch (no host sync: capturable).

    Semantics: `v[t, j*R + i] = x[t] . a_rows[row_index[row_start[s] + i], j*in:(j+1)*in]` for
    token t of segment s, slice j, i < rank[s] (R = info.max_rank), accumulated in float32.
    Other entries of v (base rows, i >= rank[s]) are left unset; nothing reads them.

    Args:
        x: [num_tokens, in_features], float32/float16/bfloat16.
        a_rows: [max_rows, num_slices * in_features], x.dtype; any row stride.
        info: the step's segments on x.device.
        num_slices: 1 (o/down), 2 (gate/up) or 3 (q/k/v).
        out: where to write v (float32, that shape, any strides); None allocates it.
        config: launch parameters (sweeps); None = the tuned defaults.

    Returns:
        v: [num_tokens, num_slices * max_rank] float32 (`out` when given).
    """
    cfg = config or ShrinkConfig()
    num_tokens, in_features = x.shape
    assert a_rows.shape[1] == num_slices * in_features, "a_rows must be [rows, slices * in]"
    assert a_rows.dtype == x.dtype, "x and a_rows must share a dtype"
    v_shape = (num_tokens, num_slices * info.max_rank)
    v = torch.empty(v_shape, dtype=torch.float32, device=x.device) if out is None else out
    assert v.shape == v_shape, "out must be [num_tokens, num_slices * max_rank]"
    assert v.dtype == torch.float32, "out must be float32"
    max_units = info.max_shrink_tiles * num_slices
    if max_units == 0 or num_tokens == 0:
        return v
    k_chunks = triton.cdiv(in_features, cfg.block_k)
    split_cap = max(1, min(cfg.max_split, k_chunks // cfg.min_k_chunks))
    num_programs = cfg.num_programs or cfg.programs_per_sm * num_sms(x.device)
    num_programs = min(num_programs, max_units * split_cap)
    assert num_programs <= 2 * NUM_COUNTERS, "more programs than split-K counters"
    block_m, block_r = info.block_m, SHRINK_BLOCK_R
    # Partials only when a split can happen: then units * splits <= num_programs.
    may_split = split_cap > 1 and num_programs >= 2
    partials = torch.empty(num_programs * block_m * block_r if may_split else 1,
                           dtype=torch.float32, device=x.device)  # fmt: skip
    _lora_shrink_kernel[(num_programs,)](
        x, a_rows, v, partials, info.counters,
        info.seg_indptr, info.seg_rank, info.seg_row_start, info.row_index, info.shrink_tiles,
        info.counts,
        in_features, info.max_rank, num_slices, split_cap,
        x.stride(0), x.stride(1), a_rows.stride(0), a_rows.stride(1), v.stride(0), v.stride(1),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=cfg.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return v
