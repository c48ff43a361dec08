"""LoraBatchInfo: a step's LoRA segments, the arena rows each one reads, and the work lists the
kernels walk. Host-side building only (numpy, torch; no kernels): `prepare_lora_batch_info` for an
eager step (exact sizes), `LoraBatchBuffers` for CUDA graphs (static tensors refilled each step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

import numpy as np
import torch

# Rank rows per shrink tile: a rank-r segment gets ceil(r / 16) tiles, so mixed ranks share one
# launch without padding any adapter to the largest rank (16 is the smallest tile `tl.dot` takes).
SHRINK_BLOCK_R: Final = 16
# Split-K arrival counters: one per (shrink tile, slice) that a step splits. The shrink splits
# only while tiles * slices * splits fits its fixed grid, so this bounds that grid at twice it.
NUM_COUNTERS: Final = 4096
# Entries of `counts`.
COUNT_SEGMENTS, COUNT_SHRINK_TILES, COUNT_LORA_TILES, COUNT_TOKEN_TILES = range(4)


class LoraBatchLayout(NamedTuple):
    """Capacity of a LoraBatchInfo's tensors (all views of one int32 buffer, one upload)."""

    max_segments: int
    max_row_entries: int  # sum of the segments' ranks
    max_shrink_tiles: int
    max_token_tiles: int
    max_rank: int  # v's columns per slice; every segment's rank is at most this
    block_m: int  # tokens per tile, for shrink and expand alike

    @staticmethod
    def for_capacity(
        *, max_tokens: int, max_segments: int, max_row_entries: int, max_rank: int, block_m: int
    ) -> LoraBatchLayout:
        """The layout that holds any step of at most these sizes (a decode graph's bucket)."""
        max_segments = min(max_segments, max_tokens)
        token_tiles = token_tile_bound(max_tokens, max_segments, block_m)
        return LoraBatchLayout(
            max_segments=max_segments,
            max_row_entries=max_row_entries,
            max_shrink_tiles=token_tiles * -(-max_rank // SHRINK_BLOCK_R),
            max_token_tiles=token_tiles,
            max_rank=max_rank,
            block_m=block_m,
        )

    def sizes(self) -> list[int]:
        """counts, seg_indptr, seg_rank, seg_row_start, seg_scaling, seg_v_col, row_index, tiles
        (int32s)."""
        n = self.max_segments
        return [4, n + 1, n, n, n, n, self.max_row_entries, 3 * self.max_shrink_tiles,
                2 * self.max_token_tiles]  # fmt: skip

    def num_elems(self) -> int:
        return sum(self.sizes())


def token_tile_bound(max_tokens: int, max_segments: int, block_m: int) -> int:
    """Most token tiles of `block_m` rows that segments of `max_tokens` tokens can need:
    sum(ceil(len / m)) <= tokens // m + segments, and never more than one per token."""
    return min(max_tokens, max_tokens // block_m + min(max_segments, max_tokens))


class LoraBatchInfo(NamedTuple):
    """One step's LoRA segments. Tokens are sorted so that each segment is one run of rows
    sharing an adapter; segment s of rank r reads arena rows `row_index[row_start[s] + i]`,
    i < r (any order, need not be contiguous). Rank 0 = base-model rows.

    Device tensors (int32 unless noted); rows past `counts` are unused:
    """

    seg_indptr: torch.Tensor  # [max_segments + 1] token offsets
    seg_rank: torch.Tensor  # [max_segments]; 0 = no LoRA
    seg_row_start: torch.Tensor  # [max_segments] into row_index
    seg_scaling: torch.Tensor  # [max_segments] float32 (lora_alpha / r, alpha / sqrt(r) rsLoRA)
    # [max_segments]: where the segment's rank columns start in a stacked v (the `*_cols` ops'
    # v, e.g. a `[W; A_hot]` GEMM's shrink columns); 0 when not given, unread by the others
    seg_v_col: torch.Tensor
    row_index: torch.Tensor  # [max_row_entries] physical arena rows
    shrink_tiles: torch.Tensor  # [max_shrink_tiles, 3]: (segment, first token, first rank)
    # [max_token_tiles, 2]: (segment, first token); tiles of LoRA segments first, then base ones
    token_tiles: torch.Tensor
    counts: torch.Tensor  # [4]: segments, shrink tiles, LoRA token tiles, all token tiles
    counters: torch.Tensor  # [NUM_COUNTERS] zeros: the shrink's split-K workspace (kept zero)
    # Host ints: exact for an eager step; the bucket's bounds under CUDA graphs (they size the
    # kernels' fixed grids; the work itself follows `counts`).
    max_rank: int
    block_m: int
    max_shrink_tiles: int
    max_lora_tiles: int
    max_token_tiles: int


class _Packed(NamedTuple):
    buffer: np.ndarray  # [layout.num_elems()] int32
    num_shrink_tiles: int
    num_lora_tiles: int
    num_token_tiles: int


def _check(
    seg_lens: Sequence[int],
    seg_rows: Sequence[Sequence[int]],
    seg_scaling: Sequence[float],
    max_rank: int,
    seg_v_col: Sequence[int] | None = None,
) -> None:
    if not len(seg_lens) == len(seg_rows) == len(seg_scaling):
        raise ValueError("seg_lens, seg_rows and seg_scaling need one entry per segment")
    if seg_v_col is not None and (len(seg_v_col) != len(seg_lens) or min(seg_v_col, default=0) < 0):
        raise ValueError("seg_v_col needs one non-negative entry per segment")
    if min(seg_lens, default=0) < 0:
        raise ValueError("segment lengths must be non-negative")
    rank = max((len(rows) for rows in seg_rows), default=0)
    if rank > max_rank:
        raise ValueError(f"a segment's rank {rank} > max_rank {max_rank}")


def _pack(
    layout: LoraBatchLayout,
    seg_lens: Sequence[int],
    seg_rows: Sequence[Sequence[int]],
    seg_scaling: Sequence[float],
    seg_v_col: Sequence[int] | None = None,
) -> _Packed:
    """Segments -> the layout's int32 buffer (scaling as float32 bits). Raises ValueError on
    input that does not fit or does not make sense."""
    _check(seg_lens, seg_rows, seg_scaling, layout.max_rank, seg_v_col)
    num_segments = len(seg_lens)
    if num_segments > layout.max_segments:
        raise ValueError(f"{num_segments} segments > capacity {layout.max_segments}")
    ranks = [len(rows) for rows in seg_rows]
    indptr = np.zeros(num_segments + 1, dtype=np.int64)
    np.cumsum(seg_lens, out=indptr[1:])
    row_start = np.zeros(num_segments + 1, dtype=np.int64)
    np.cumsum(ranks, out=row_start[1:])
    if row_start[-1] > layout.max_row_entries:
        raise ValueError(f"{row_start[-1]} row entries > capacity {layout.max_row_entries}")
    lora_tiles: list[tuple[int, int]] = []
    base_tiles: list[tuple[int, int]] = []
    shrink_tiles: list[tuple[int, int, int]] = []
    block_m = layout.block_m
    for seg in range(num_segments):
        tiles = [(seg, m0) for m0 in range(int(indptr[seg]), int(indptr[seg + 1]), block_m)]
        if ranks[seg] == 0:
            base_tiles += tiles
            continue
        lora_tiles += tiles
        shrink_tiles += [(s, m0, r0) for s, m0 in tiles
                         for r0 in range(0, ranks[seg], SHRINK_BLOCK_R)]  # fmt: skip
    token_tiles = lora_tiles + base_tiles
    if len(token_tiles) > layout.max_token_tiles or len(shrink_tiles) > layout.max_shrink_tiles:
        raise ValueError("more tiles than the layout holds (more tokens than its capacity?)")

    buffer = np.zeros(layout.num_elems(), dtype=np.int32)
    fields = np.split(buffer, np.cumsum(layout.sizes())[:-1])
    fields[0][:] = (num_segments, len(shrink_tiles), len(lora_tiles), len(token_tiles))
    fields[1][: num_segments + 1] = indptr
    fields[2][:num_segments] = ranks
    fields[3][:num_segments] = row_start[:-1]
    fields[4][:num_segments] = np.asarray(seg_scaling, dtype=np.float32).view(np.int32)
    if seg_v_col is not None:
        fields[5][:num_segments] = seg_v_col
    if row_start[-1]:
        fields[6][: row_start[-1]] = np.concatenate([np.asarray(r) for r in seg_rows])
    fields[7][: 3 * len(shrink_tiles)] = np.asarray(shrink_tiles, dtype=np.int32).reshape(-1)
    fields[8][: 2 * len(token_tiles)] = np.asarray(token_tiles, dtype=np.int32).reshape(-1)
    return _Packed(buffer, len(shrink_tiles), len(lora_tiles), len(token_tiles))


def _views(
    layout: LoraBatchLayout,
    buffer: torch.Tensor,
    counters: torch.Tensor,
    bounds: tuple[int, int, int],
) -> LoraBatchInfo:
    counts, indptr, rank, row_start, scaling, v_col, rows, shrink, tokens = buffer.split(
        layout.sizes()
    )
    return LoraBatchInfo(
        seg_indptr=indptr,
        seg_rank=rank,
        seg_row_start=row_start,
        seg_scaling=scaling.view(torch.float32),
        seg_v_col=v_col,
        row_index=rows,
        shrink_tiles=shrink.view(-1, 3),
        token_tiles=tokens.view(-1, 2),
        counts=counts,
        counters=counters,
        max_rank=layout.max_rank,
        block_m=layout.block_m,
        max_shrink_tiles=bounds[0],
        max_lora_tiles=bounds[1],
        max_token_tiles=bounds[2],
    )


def default_block_m(max_seg_len: int) -> int:
    """Token tile height: 16 for decode (the smallest `tl.dot` tile), taller for prefill."""
    return 16 if max_seg_len <= 16 else 32 if max_seg_len <= 32 else 64


def prepare_lora_batch_info(
    seg_lens: Sequence[int],
    seg_rows: Sequence[Sequence[int]],
    seg_scaling: Sequence[float],
    *,
    max_rank: int,
    device: torch.device | str = "cpu",
    block_m: int | None = None,
    seg_v_col: Sequence[int] | None = None,
) -> LoraBatchInfo:
    """An eager step's LoraBatchInfo, sized exactly (one H2D copy plus the counters' memset).

    Args:
        seg_lens: tokens of each segment, in row order (they cover the step's rows).
        seg_rows: each segment's physical arena rows, one per rank index; () = base model.
        seg_scaling: each segment's LoRA scaling (ignored for base segments).
        max_rank: v's columns per slice (>= every segment's rank; the model's max LoRA rank).
        block_m: token tile height; None picks one from the longest segment.
        seg_v_col: each segment's first column in a stacked v (`lora_expand_cols`); None = 0s.
    """
    _check(seg_lens, seg_rows, seg_scaling, max_rank, seg_v_col)
    if block_m is None:
        block_m = default_block_m(max(seg_lens, default=0))
    layout = LoraBatchLayout(
        max_segments=len(seg_lens),
        max_row_entries=sum(len(rows) for rows in seg_rows),
        max_shrink_tiles=sum(-(-n // block_m) * -(-len(r) // SHRINK_BLOCK_R)
                             for n, r in zip(seg_lens, seg_rows, strict=True)),
        max_token_tiles=sum(-(-n // block_m) for n in seg_lens),
        max_rank=max_rank,
        block_m=block_m,
    )  # fmt: skip
    packed = _pack(layout, seg_lens, seg_rows, seg_scaling, seg_v_col)
    host = torch.from_numpy(packed.buffer)
    if torch.device(device).type == "cuda":
        # NOTE: pinned and non-blocking: a pageable copy waits for every step already queued,
        # and the overlap schedule launches a step while the one before it still runs.
        buffer = host.pin_memory().to(device, non_blocking=True)
    else:
        buffer = host.to(device)
    counters = torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device)
    bounds = (packed.num_shrink_tiles, packed.num_lora_tiles, packed.num_token_tiles)
    return _views(layout, buffer, counters, bounds)


class LoraBatchBuffers:
    """Static device tensors of one capacity (a decode graph's largest bucket): `info()` views
    never move, so graphs captured on them replay with whatever `fill` wrote last."""

    def __init__(
        self,
        *,
        max_tokens: int,
        max_segments: int,
        max_row_entries: int,
        max_rank: int,
        device: torch.device,
        block_m: int = 16,
    ) -> None:
        self.max_tokens = max_tokens
        self.layout = LoraBatchLayout.for_capacity(
            max_tokens=max_tokens, max_segments=max_segments,
            max_row_entries=max_row_entries, max_rank=max_rank, block_m=block_m,
        )  # fmt: skip
        self.device = device
        size = self.layout.num_elems()
        # NOTE: zeros = no segments, so the kernels do nothing until the first fill.
        self._buffer = torch.zeros(size, dtype=torch.int32, device=device)
        self._counters = torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device)
        pinned = device.type == "cuda"
        # Two staging buffers, used in turn: filling step n waits for step n-2's copy only.
        self._staging = [torch.zeros(size, dtype=torch.int32, pin_memory=pinned) for _ in "ab"]
        self._copy_done: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def info(self, max_tokens: int) -> LoraBatchInfo:
        """Views for steps of at most `max_tokens` tokens (a bucket): same tensors, that
        bucket's bounds on the grids."""
        assert max_tokens <= self.max_tokens, "bucket larger than the buffers' capacity"
        bucket = LoraBatchLayout.for_capacity(
            max_tokens=max_tokens, max_segments=self.layout.max_segments,
            max_row_entries=self.layout.max_row_entries, max_rank=self.layout.max_rank,
            block_m=self.layout.block_m,
        )  # fmt: skip
        bounds = (bucket.max_shrink_tiles, bucket.max_token_tiles, bucket.max_token_tiles)
        return _views(self.layout, self._buffer, self._counters, bounds)

    def fill(
        self,
        seg_lens: Sequence[int],
        seg_rows: Sequence[Sequence[int]],
        seg_scaling: Sequence[float],
        seg_v_col: Sequence[int] | None = None,
    ) -> None:
        """Write a step's segments (as in `prepare_lora_batch_info`); one pinned H2D copy,
        queued on the current stream without a host sync."""
        if sum(seg_lens) > self.max_tokens:
            raise ValueError(f"{sum(seg_lens)} tokens > capacity {self.max_tokens}")
        packed = _pack(self.layout, seg_lens, seg_rows, seg_scaling, seg_v_col)
        turn, self._turn = self._turn, 1 - self._turn
        done = self._copy_done[turn]
        if done is not None:
            # NOTE: the copy of two steps ago may still be reading this staging buffer.
            done.synchronize()
        staging = self._staging[turn]
        staging.copy_(torch.from_numpy(packed.buffer))
        non_blocking = self.device.type == "cuda"
        # Stream-ordered after the previous step's kernels, which still read the buffer.
        self._buffer.copy_(staging, non_blocking=non_blocking)
        if non_blocking:
            self._copy_done[turn] = torch.cuda.current_stream(self.device).record_event()
