"""The GPU memory arena's accounting: KV pages and LoRA rows under one budget. Pure; the
scheduler's planner owns the only instance. The runner owns the memory; this hands out ids.

Geometry (RunnerReady): `num_pages` pages of `page_bytes` from the bottom; `max_rows` rows of
`row_bytes` overlay the top, so a row covers one or more pages and a page may lie under several
rows. A page serves KV only while no allocated row covers it, a row only while none of its
pages holds KV. KV takes pages lowest-first and rows go highest-first, so the two grow toward
each other and meet wherever demand puts the boundary. Floors (see `arena_floors`) keep the
bottom pages for KV and the top rows for adapters whatever the demand.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from typing import Final, NamedTuple

from lorasrv.ids import BlockId

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
    return Floors(kv, min(wanted, geometry.max_rows - _first_row_above(geometry, kv)))


def _first_row_above(geometry: ArenaGeometry, page: int) -> int:
    """The lowest row that covers no page below `page`."""
    start = page * geometry.page_bytes - geometry.rows_offset
    return min(geometry.max_rows, max(0, -(-start // geometry.row_bytes)))


class Arena:
    """Which pages hold KV and which rows hold adapters; every count kept exact for the planner.

    Free lists are heaps with lazy deletion: an id may sit in a heap while taken (it is dropped
    when popped), and `_in_heap` keeps each id in its heap at most once.
    """

    def __init__(self, geometry: ArenaGeometry, floors: Floors) -> None:
        self.geometry = geometry
        self.floors = floors
        num_pages, max_rows = geometry.num_pages, geometry.max_rows
        #: Rows from here up may be allocated (they cover no page of the KV floor).
        self.first_row = _first_row_above(geometry, floors.kv_pages) if max_rows else 0
        #: Pages below this may hold KV (they lie under no row of the adapter floor).
        self.kv_limit = (
            geometry.row_pages(max_rows - floors.rows).start if floors.rows else num_pages
        )
        self._is_kv = bytearray(num_pages)
        self._cover = [0] * num_pages  # allocated rows over each page
        self._is_row = bytearray(max_rows)
        self._row_kv = [0] * max_rows  # KV pages under each row
        self._page_heap = list(range(self.kv_limit))  # min-heap: lowest page first
        self._page_in_heap = bytearray([1]) * self.kv_limit + bytearray(num_pages - self.kv_limit)
        self._row_heap = [-r for r in reversed(range(self.first_row, max_rows))]  # highest first
        self._row_in_heap = bytearray(self.first_row) + bytearray([1]) * (max_rows - self.first_row)
        self.num_free_pages = self.kv_limit
        self.num_used_pages = 0
        self.num_free_rows = max_rows - self.first_row
        self.num_used_rows = 0

    # ------------------------------------------------------------------ KV pages

    @property
    def num_pages(self) -> int:
        """Pages KV could hold if no adapter row stood in the way (what a prompt may use)."""
        return self.kv_limit

    def can_allocate(self, num: int) -> bool:
        return num <= self.num_free_pages

    def allocate(self, num: int) -> list[BlockId]:
        """Take `num` pages, lowest first; the caller checked `can_allocate`."""
        assert num <= self.num_free_pages, f"allocate({num}) with {self.num_free_pages} free"
        taken: list[BlockId] = []
        while len(taken) < num:
            page = heapq.heappop(self._page_heap)
            self._page_in_heap[page] = 0
            if not self._is_kv[page] and not self._cover[page]:
                self._take_page(page)
                taken.append(BlockId(page))
        return taken

    def free(self, pages: Iterable[BlockId]) -> None:
        for page in pages:
            # NOTE: a double free would hand one page to two sequences and corrupt both.
            assert self._is_kv[page], f"double free of page {page}"
            self._is_kv[page] = 0
            self.num_used_pages -= 1
            self.num_free_pages += 1
            self._push_page(page)
            for row in self.geometry.page_rows(page):
                self._row_kv[row] -= 1
                if not self._row_kv[row] and not self._is_row[row] and row >= self.first_row:
                    self.num_free_rows += 1
                    self._push_row(row)

    def _take_page(self, page: int) -> None:
        self._is_kv[page] = 1
        self.num_free_pages -= 1
        self.num_used_pages += 1
        for row in self.geometry.page_rows(page):
            self._row_kv[row] += 1
            if self._row_kv[row] == 1 and not self._is_row[row] and row >= self.first_row:
                self.num_free_rows -= 1

    # ------------------------------------------------------------------ LoRA rows

    def can_allocate_rows(self, num: int) -> bool:
        return num <= self.num_free_rows

    def allocate_rows(self, num: int) -> tuple[int, ...]:
        """Take `num` rows, the highest free ones; the caller checked `can_allocate_rows`.
        Returned ascending, so free neighbours form one run: an upload is then one host-to-device
        copy per run, not one per row."""
        assert num <= self.num_free_rows, f"allocate_rows({num}) with {self.num_free_rows} free"
        taken: list[int] = []
        while len(taken) < num:
            row = -heapq.heappop(self._row_heap)
            self._row_in_heap[row] = 0
            if not self._is_row[row] and not self._row_kv[row]:
                self._take_row(row)
                taken.append(row)
        return tuple(reversed(taken))

    def free_rows(self, rows: Iterable[int]) -> None:
        for row in rows:
            assert self._is_row[row], f"double free of row {row}"
            self._is_row[row] = 0
            self.num_used_rows -= 1
            self.num_free_rows += 1
            self._push_row(row)
            for page in self.geometry.row_pages(row):
                self._cover[page] -= 1
                if not self._cover[page] and page < self.kv_limit:
                    self.num_free_pages += 1
                    self._push_page(page)

    def _take_row(self, row: int) -> None:
        self._is_row[row] = 1
        self.num_free_rows -= 1
        self.num_used_rows += 1
        for page in self.geometry.row_pages(row):
            self._cover[page] += 1
            if self._cover[page] == 1 and page < self.kv_limit:
                self.num_free_pages -= 1

    def rows_free_pages(self, rows: Iterable[int]) -> bool:
        """Would freeing `rows` give KV at least one page? (Some row reaches below kv_limit.)"""
        return any(self.geometry.row_pages(row).start < self.kv_limit for row in rows)

    # ------------------------------------------------------------------ heaps

    def _push_page(self, page: int) -> None:
        if not self._page_in_heap[page] and page < self.kv_limit:
            self._page_in_heap[page] = 1
            heapq.heappush(self._page_heap, page)

    def _push_row(self, row: int) -> None:
        if not self._row_in_heap[row]:
            self._row_in_heap[row] = 1
            heapq.heappush(self._row_heap, -row)

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """Recount everything from the page and row tables; raise AssertionError on a mismatch."""
        geo = self.geometry
        for page in range(geo.num_pages):
            cover = sum(self._is_row[r] for r in geo.page_rows(page))
            assert self._cover[page] == cover, f"page {page}: cover {self._cover[page]} != {cover}"
            assert not (self._is_kv[page] and cover), f"page {page} holds KV under a row"
            assert not self._is_kv[page] or page < self.kv_limit, f"KV page {page} in row floor"
        for row in range(geo.max_rows):
            kv = sum(self._is_kv[p] for p in geo.row_pages(row))
            assert self._row_kv[row] == kv, f"row {row}: kv {self._row_kv[row]} != {kv}"
            assert not self._is_row[row] or row >= self.first_row, f"row {row} in KV floor"
        free_pages = [p for p in range(self.kv_limit) if not self._is_kv[p] and not self._cover[p]]
        free_rows = [
            r
            for r in range(self.first_row, geo.max_rows)
            if not self._is_row[r] and not self._row_kv[r]
        ]
        assert self.num_free_pages == len(free_pages), "free page count"
        assert self.num_used_pages == sum(self._is_kv), "used page count"
        assert self.num_free_rows == len(free_rows), "free row count"
        assert self.num_used_rows == sum(self._is_row), "used row count"
        assert all(self._page_in_heap[p] for p in free_pages), "a free page left its heap"
        assert all(self._row_in_heap[r] for r in free_rows), "a free row left its heap"
        assert self.kv_limit >= self.floors.kv_pages or not geo.max_rows, "KV floor"
