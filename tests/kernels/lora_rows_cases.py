"""Generated LoRA-over-arena-rows cases (punica-style grids): segment popularity x batch size x
ranks, each adapter's rank rows scattered and shuffled over an arena poisoned with NaN.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import torch
from lorasrv_kernels import LoraBatchInfo, prepare_lora_batch_info

# How a step's tokens spread over its adapters.
POPULARITY = ("distinct", "uniform", "zipf", "skewed", "identical")
# Rank sets an adapter's rank is drawn from; 0 = base rows (no adapter). max_rank = the largest.
RANK_SETS: dict[str, tuple[int, ...]] = {
    "mixed": (0, 4, 8, 16, 20, 32),  # 20: a partial second rank tile
    "uniform16": (16,),
    "small": (0, 1, 3),
    "llama": (0, 8, 16, 32, 64),  # issue 12's ranks, with base rows
}
ARENA_PAD = 8  # elements between and around the A and B parts, poisoned like unused rows


def segment_lens(
    popularity: str, num_tokens: int, num_adapters: int, rng: random.Random
) -> list[int]:
    """Token counts per segment (some may be 0: empty segments are legal)."""
    if popularity == "distinct":
        return [1] * num_tokens
    if popularity == "identical":
        return [num_tokens]
    if popularity == "skewed":  # [1, n-1]
        return [1, num_tokens - 1] if num_tokens > 1 else [1]
    if popularity == "uniform":
        picks = [rng.randrange(num_adapters) for _ in range(num_tokens)]
    else:  # zipf, alpha 1
        weights = [1 / (k + 1) for k in range(num_adapters)]
        picks = rng.choices(range(num_adapters), weights=weights, k=num_tokens)
    return [picks.count(a) for a in range(num_adapters)]


class RowsCase(NamedTuple):
    x: torch.Tensor  # [num_tokens, in_features]
    y: torch.Tensor  # [num_tokens, out_total]: the base output before the delta
    arena: torch.Tensor  # [max_rows, row_elems], NaN outside the adapters' parts
    a_rows: torch.Tensor  # [max_rows, num_slices * in_features] view of the arena
    bt_rows: torch.Tensor  # [max_rows, out_total] view of the arena
    info: LoraBatchInfo
    slice_offsets: tuple[int, ...]
    seg_lens: list[int]
    seg_rows: list[list[int]]


def make_rows_case(
    *,
    seg_lens: list[int],
    seg_ranks: list[int],
    in_features: int,
    slice_sizes: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    max_rank: int | None = None,
) -> RowsCase:
    """Random adapters in shuffled, non-contiguous arena rows (every other row at most); the
    rest of the arena, the padding between parts and base segments' scaling are NaN."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_slices, out_total = len(slice_sizes), sum(slice_sizes)
    total_rank = sum(seg_ranks)
    max_rows = 2 * total_rank + 3
    pool = rng.sample(range(max_rows), total_rank)  # shuffled, with holes
    seg_rows, used = [], 0
    for rank in seg_ranks:
        seg_rows.append(pool[used : used + rank])
        used += rank
    a_off = ARENA_PAD
    b_off = a_off + num_slices * in_features + ARENA_PAD
    arena = torch.full((max_rows, b_off + out_total + ARENA_PAD), math.nan)
    a_rows = arena[:, a_off : a_off + num_slices * in_features]
    bt_rows = arena[:, b_off : b_off + out_total]
    for rows in seg_rows:
        if rows:
            a_rows[rows] = torch.randn(len(rows), a_rows.shape[1], generator=gen) / math.sqrt(
                in_features
            )
            bt_rows[rows] = torch.randn(len(rows), out_total, generator=gen) / math.sqrt(len(rows))
    scaling = [math.nan if r == 0 else 2.0 / r + 0.25 * s for s, r in enumerate(seg_ranks)]
    offsets = [0]
    for size in slice_sizes:
        offsets.append(offsets[-1] + size)
    num_tokens = sum(seg_lens)
    arena = arena.to(dtype=dtype, device=device)
    num_a = num_slices * in_features
    info = prepare_lora_batch_info(seg_lens, seg_rows, scaling, device=device,
                                   max_rank=max_rank or max(seg_ranks, default=0) or 1)  # fmt: skip
    return RowsCase(
        x=torch.randn(num_tokens, in_features, generator=gen).to(dtype=dtype, device=device),
        y=torch.randn(num_tokens, out_total, generator=gen).to(dtype=dtype, device=device),
        arena=arena,
        a_rows=arena[:, a_off : a_off + num_a],
        bt_rows=arena[:, b_off : b_off + out_total],
        info=info,
        slice_offsets=tuple(offsets),
        seg_lens=seg_lens,
        seg_rows=seg_rows,
    )


def grid_case(
    popularity: str,
    num_tokens: int,
    rank_set: str,
    *,
    in_features: int,
    slice_sizes: tuple[int, ...],
    num_adapters: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> RowsCase:
    rng = random.Random(f"{popularity}-{num_tokens}-{rank_set}-{seed}")
    seg_lens = segment_lens(popularity, num_tokens, num_adapters, rng)
    ranks = RANK_SETS[rank_set]
    seg_ranks = [rng.choice(ranks) for _ in seg_lens]
    return make_rows_case(seg_lens=seg_lens, seg_ranks=seg_ranks, in_features=in_features,
                          slice_sizes=slice_sizes, dtype=dtype, device=device, seed=seed,
                          max_rank=max(ranks))  # fmt: skip


def lora_token_mask(case: RowsCase) -> torch.Tensor:
    """[num_tokens] bool: rows of segments with an adapter."""
    mask = torch.zeros(sum(case.seg_lens), dtype=torch.bool)
    start = 0
    for length, rows in zip(case.seg_lens, case.seg_rows, strict=True):
        mask[start : start + length] = bool(rows)
        start += length
    return mask


def defined_v_mask(case: RowsCase, num_slices: int) -> torch.Tensor:
    """[num_tokens, num_slices * max_rank] bool: the shrink entries the contract defines."""
    max_rank = case.info.max_rank
    mask = torch.zeros(sum(case.seg_lens), num_slices, max_rank, dtype=torch.bool)
    start = 0
    for length, rows in zip(case.seg_lens, case.seg_rows, strict=True):
        mask[start : start + length, :, : len(rows)] = True
        start += length
    return mask.view(mask.shape[0], -1)
