"""LoRA weights on the device: views of the arena's rows per layer and module, and the copies that
write an adapter's host rows into the rows the scheduler gave it.

A row is an index into the arena's rows, never a pointer. Knows nothing of adapter names,
residency or policy; streams and events are the uploader's (uploads.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from lorasrv.model.lora_layout import RowLayout, row_runs


class HotModule(NamedTuple):
    """A targeted linear's stacked buffer (hot_cache.py): its weight's rows, then one block of
    `hot` A rows per slice, so one GEMM gives the base output and the hot adapters' shrink."""

    stacked: torch.Tensor  # [out_features + num_slices * hot, in_features]; W = stacked[:out]
    bias: torch.Tensor | None  # [out_features + num_slices * hot]: the bias, zeros under A
    hot: int  # hot rows per slice block


class ModuleLora(NamedTuple):
    """One (layer, pool module)'s LoRA weights over every row of the arena.

    `a_rows[r, j*in:(j+1)*in]` is row r's A vector of slice j; `bt_rows[r, off_j:off_{j+1}]` its
    B column of slice j. Both are strided views (row stride `row_elems`), never copies.
    """

    a_rows: torch.Tensor  # [max_rows, num_slices * in_features]
    bt_rows: torch.Tensor  # [max_rows, out_features]
    slice_offsets: tuple[int, ...]  # num_slices + 1 host ints, the last one == out_features
    hot: HotModule | None = None  # the stacked `[W; A_hot]` buffer, when the runner keeps one


class LoraPool:
    """Row views into the arena, per (layer, pool module)."""

    def __init__(self, rows: torch.Tensor, layout: RowLayout) -> None:
        assert rows.shape[1] == layout.row_elems, "arena rows must have the layout's width"
        self.rows = rows  # [max_rows, row_elems]
        self.layout = layout
        self.modules: dict[tuple[int, str], ModuleLora] = {}
        for key, place in layout.modules.items():
            self.modules[key] = ModuleLora(
                a_rows=rows[:, place.a_offset : place.a_offset + place.a_elems],
                bt_rows=rows[:, place.b_offset : place.b_offset + place.b_elems],
                slice_offsets=place.shape.slice_offsets,
            )

    @property
    def max_rows(self) -> int:
        return int(self.rows.shape[0])

    def module(self, layer: int, name: str) -> ModuleLora | None:
        return self.modules.get((layer, name))

    def write(self, rows: Sequence[int], host: torch.Tensor) -> None:
        """`self.rows[rows[i]] = host[i]`: one copy per run of consecutive rows, on the current
        stream (non-blocking from pinned memory). Rows past the host copy's rank (an adapter
        given more rows than its tensors use) are zeroed: the kernels read every row they get.

        NOTE: non_blocking from pinned memory is safe even if the host copy is dropped meanwhile:
        the caching host allocator keeps the block until the copy on this stream has finished.
        """
        if len(rows) < host.shape[0]:
            raise ValueError(f"{len(rows)} rows for a host copy of rank {host.shape[0]}")
        if rows and not 0 <= min(rows) <= max(rows) < self.max_rows:
            raise ValueError(f"LoRA row outside [0, {self.max_rows})")
        if len(set(rows)) != len(rows):
            raise ValueError("an adapter's rows must be distinct")
        non_blocking = host.is_pinned()
        rank = host.shape[0]
        for first, start, length in row_runs(rows[:rank]):
            self.rows[start : start + length].copy_(
                host[first : first + length], non_blocking=non_blocking
            )
        for _, start, length in row_runs(rows[rank:]):
            self.rows[start : start + length].zero_()
