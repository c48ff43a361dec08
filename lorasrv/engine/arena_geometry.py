"""The arena's geometry: where LoRA rows overlay KV pages, and the floors that keep the bottom
pages for KV and the top rows for adapters whatever the demand. Pure: no asyncio, no torch.

`num_pages` pages of `page_bytes` from the bottom; `max_rows` rows of `row_bytes` overlay the
top, so a row covers one or more pages and a page may lie under several rows.
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple

#: KV keeps at least this share of the arena's pages (besides one full-context sequence).
KV_FLOOR_SHARE: Final = 0.10
#: Adapter rows kept, in adapters of the maximum rank, when --max-loras-per-batch is unset.
DEFAULT_ADAPTER_FLOOR: Final = 8


def pages_needed(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class ArenaGeometry(NamedTuple):
    num_pages: int
    page_bytes: int
    row_bytes: int  # 0 when LoRA is off
    max_rows: int  # 0 when LoRA is off

    @property
    def rows_offset(self) -> int:
        """Byte offset of row 0: the rows end exactly at the arena's end."""
        return self.num_pages * self.page_bytes - self.max_rows * self.row_bytes

    def row_pages(self, row: int) -> range:
        """The pages row `row` covers (at least one)."""
        start = self.rows_offset + row * self.row_bytes
        return range(start // self.page_bytes, (start + self.row_bytes - 1) // self.page_bytes + 1)

    def page_rows(self, page: int) -> range:
        """The rows that cover page `page` (often none)."""
        if not self.max_rows:
            return range(0)
        low = page * self.page_bytes - self.rows_offset
        high = (page + 1) * self.page_bytes - self.rows_offset
        return range(max(0, low // self.row_bytes), min(self.max_rows, -(-high // self.row_bytes)))


class Floors(NamedTuple):
    """KV owns pages [0, kv_pages) for good; adapters own the top `rows` rows for good."""

    kv_pages: int
    rows: int


def arena_floors(
    geometry: ArenaGeometry,
    *,
    page_size: int,
    context_length: int,
    max_lora_rank: int,
    max_loras_per_batch: int | None,
) -> Floors:
    """KV: one full-context sequence and KV_FLOOR_SHARE of the pages, but never so many that
    one adapter of the maximum rank no longer fits (an arena smaller than a full context still
    serves adapters); adapters: `max_loras_per_batch` (DEFAULT_ADAPTER_FLOOR when unset)
    adapters of the maximum rank, or as many rows as the arena has above the KV floor."""
    kv = min(
        geometry.num_pages,
        max(
            pages_needed(context_length, page_size), math.ceil(KV_FLOOR_SHARE * geometry.num_pages)
        ),
    )
    if not geometry.max_rows:
        return Floors(kv, 0)
    one_adapter = geometry.max_rows - max_lora_rank  # the lowest row one adapter would need
    if max_lora_rank and one_adapter >= 0:
        kv = min(kv, geometry.row_pages(one_adapter).start)
    wanted = (max_loras_per_batch or DEFAULT_ADAPTER_FLOOR) * max_lora_rank
    return Floors(kv, min(wanted, geometry.max_rows - first_row_above(geometry, kv)))


def first_row_above(geometry: ArenaGeometry, page: int) -> int:
    """The lowest row that covers no page below `page`."""
    start = page * geometry.page_bytes - geometry.rows_offset
    return min(geometry.max_rows, max(0, -(-start // geometry.row_bytes)))
