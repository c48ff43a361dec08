"""The GPU memory arena's accounting: KV pages and LoRA rows under one budget. Pure; the
scheduler's planner owns the only instance. The runner owns the memory; this hands out ids.

Geometry (RunnerReady): `num_pages` pages of `page_bytes` from the bottom; `max_rows` rows of
`row_bytes` overlay the top, so a row covers one or more pages and a page may lie under several
rows. A page serves KV only while no allocated row covers it, a row only while none of its
pages holds KV. KV takes pages lowest-first and rows go highest-first, so the two grow toward
each other and meet wherever demand puts the boundary. Floors (arena_geometry.py) keep the
bottom pages for KV and the top rows for adapters whatever the demand.

Some KV pages are *evictable*: the prefix cache holds them for no running sequence and gives
them back on demand. KV demand counts them as allocatable (the planner evicts them first), and
a row whose KV pages are all evictable is *reclaimable*: adapter demand may take it once the
cache gave those pages back.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from lorasrv.engine.arena_geometry import (
    KV_FLOOR_SHARE,
    ArenaGeometry,
    Floors,
    arena_floors,
    first_row_above,
    pages_needed,
)
from lorasrv.ids import BlockId

# The geometry's names stay importable from here (the arena's users need both).
__all__ = ["KV_FLOOR_SHARE", "Arena", "ArenaGeometry", "Floors", "arena_floors", "pages_needed"]


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
        self.first_row = first_row_above(geometry, floors.kv_pages) if max_rows else 0
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
        self._is_evictable = bytearray(num_pages)
        self.num_evictable_pages = 0
        self._row_held = [0] * max_rows  # KV pages under each row that are not evictable
        self._reclaim_heap: list[int] = []  # reclaimable rows (lazy), highest first
        self._reclaim_in_heap = bytearray(max_rows)
        self.num_reclaimable_rows = 0

    # ------------------------------------------------------------------ KV pages

    @property
    def num_pages(self) -> int:
        """Pages KV could hold if no adapter row stood in the way (what a prompt may use)."""
        return self.kv_limit

    def can_allocate(self, num: int) -> bool:
        return num <= self.num_free_pages

    @property
    def num_allocatable_pages(self) -> int:
        """Free pages plus those the prefix cache would give back."""
        return self.num_free_pages + self.num_evictable_pages

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
            was_evictable = self._is_evictable[page]
            if was_evictable:
                self._is_evictable[page] = 0
                self.num_evictable_pages -= 1
            self._is_kv[page] = 0
            self.num_used_pages -= 1
            self.num_free_pages += 1
            self._push_page(page)
            for row in self.geometry.page_rows(page):
                before = self._is_reclaimable(row)
                self._row_kv[row] -= 1
                self._row_held[row] -= not was_evictable
                if not self._row_kv[row] and not self._is_row[row] and row >= self.first_row:
                    self.num_free_rows += 1
                    self._push_row(row)
                self._reclaimable_changed(row, before)

    def _take_page(self, page: int) -> None:
        self._is_kv[page] = 1
        self.num_free_pages -= 1
        self.num_used_pages += 1
        for row in self.geometry.page_rows(page):
            before = self._is_reclaimable(row)
            self._row_kv[row] += 1
            self._row_held[row] += 1
            if self._row_kv[row] == 1 and not self._is_row[row] and row >= self.first_row:
                self.num_free_rows -= 1
            self._reclaimable_changed(row, before)

    # ------------------------------------------------------------------ evictable KV pages

    def is_evictable(self, page: BlockId) -> bool:
        return bool(self._is_evictable[page])

    def mark_evictable(self, page: BlockId, evictable: bool) -> None:
        """The prefix cache's holders of KV page `page` went to none (True) or back (False)."""
        assert self._is_kv[page], f"page {page} holds no KV"
        assert self._is_evictable[page] != evictable, f"page {page} marked twice"
        self._is_evictable[page] = evictable
        self.num_evictable_pages += 1 if evictable else -1
        for row in self.geometry.page_rows(page):
            before = self._is_reclaimable(row)
            self._row_held[row] += -1 if evictable else 1
            self._reclaimable_changed(row, before)

    def take_reclaimable_rows(self, num: int) -> list[int]:
        """Up to `num` reclaimable rows, highest first. The caller has the cache give back
        every evictable page under them at once (they leave the reclaimable heap here)."""
        taken: list[int] = []
        while self._reclaim_heap and len(taken) < num:
            row = -heapq.heappop(self._reclaim_heap)
            self._reclaim_in_heap[row] = 0
            if self._is_reclaimable(row):
                taken.append(row)
        return taken

    def _is_reclaimable(self, row: int) -> bool:
        return (
            row >= self.first_row
            and not self._is_row[row]
            and self._row_kv[row] > 0
            and not self._row_held[row]
        )

    def _reclaimable_changed(self, row: int, before: bool) -> None:
        after = self._is_reclaimable(row)
        if after != before:
            self.num_reclaimable_rows += 1 if after else -1
        if after and not self._reclaim_in_heap[row]:
            self._reclaim_in_heap[row] = 1
            heapq.heappush(self._reclaim_heap, -row)

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
        assert all(self._is_kv[p] for p in range(geo.num_pages) if self._is_evictable[p])
        assert self.num_evictable_pages == sum(self._is_evictable), "evictable page count"
        for row in range(geo.max_rows):
            held = sum(self._is_kv[p] and not self._is_evictable[p] for p in geo.row_pages(row))
            assert self._row_held[row] == held, f"row {row}: held {self._row_held[row]} != {held}"
        reclaimable = [r for r in range(geo.max_rows) if self._is_reclaimable(r)]
        assert self.num_reclaimable_rows == len(reclaimable), "reclaimable row count"
        assert all(self._reclaim_in_heap[r] for r in reclaimable), "a reclaimable row left its heap"
        assert all(self._page_in_heap[p] for p in free_pages), "a free page left its heap"
        assert all(self._row_in_heap[r] for r in free_rows), "a free row left its heap"
        assert self.kv_limit >= self.floors.kv_pages or not geo.max_rows, "KV floor"
