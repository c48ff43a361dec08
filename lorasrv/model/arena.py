"""The GPU memory arena: one tensor per rank holding the KV pages, with LoRA rows over its top.

Owns the allocation and its geometry; who uses which page or row is the scheduler's business.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class KvGeometry(NamedTuple):
    """One KV page: every layer's K and V for `page_size` tokens of this rank's KV heads."""

    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def page_elems(self) -> int:
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim


class ArenaGeometry(NamedTuple):
    """Where pages and rows lie in the arena, in elements of its dtype.

    Pages are the arena's units: page p is elements `[p*page_elems, (p+1)*page_elems)`. Rows
    overlay the top: `max_rows = total // row_elems`, row r starts at `rows_offset + r*row_elems`,
    so a row covers the pages its elements fall in (see `pages_of_row`).
    """

    num_pages: int
    page_elems: int
    row_elems: int  # 0 when LoRA is off
    element_size: int

    @property
    def total_elems(self) -> int:
        return self.num_pages * self.page_elems

    @property
    def max_rows(self) -> int:
        return self.total_elems // self.row_elems if self.row_elems else 0

    @property
    def rows_offset(self) -> int:
        return self.total_elems - self.max_rows * self.row_elems

    @property
    def page_bytes(self) -> int:
        return self.page_elems * self.element_size

    @property
    def row_bytes(self) -> int:
        return self.row_elems * self.element_size

    def pages_of_row(self, row: int) -> range:
        """The KV pages row `row` overlays (a page holds KV only while no live row covers it)."""
        start = self.rows_offset + row * self.row_elems
        end = start + self.row_elems
        return range(start // self.page_elems, (end - 1) // self.page_elems + 1)


class Arena:
    """The tensor and its two views: KV pages (page-major) and LoRA rows.

    `kv` is `[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]`: layer l's K cache is
    `kv[:, l, 0]`, its V cache `kv[:, l, 1]`, so a page's stride spans every layer. `rows` is
    `[max_rows, row_elems]` over the top of the same memory; None without LoRA.
    """

    def __init__(
        self,
        kv: KvGeometry,
        *,
        num_pages: int,
        row_elems: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        element_size = torch.empty((), dtype=dtype).element_size()
        self.geometry = ArenaGeometry(num_pages, kv.page_elems, row_elems, element_size)
        self.kv_geometry = kv
        # Zeros, not empty: a fresh arena holds no NaN anywhere (rows and pages alike).
        self.buffer = torch.zeros(self.geometry.total_elems, dtype=dtype, device=device)
        self.kv = self.buffer.view(
            num_pages, kv.num_layers, 2, kv.page_size, kv.num_kv_heads, kv.head_dim
        )
        geometry = self.geometry
        self.rows: torch.Tensor | None = None
        if geometry.max_rows > 0:
            self.rows = self.buffer[geometry.rows_offset :].view(geometry.max_rows, row_elems)

    @property
    def num_pages(self) -> int:
        return self.geometry.num_pages

    @property
    def page_size(self) -> int:
        return self.kv_geometry.page_size

    @property
    def num_bytes(self) -> int:
        return self.geometry.total_elems * self.geometry.element_size
