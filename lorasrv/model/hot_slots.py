"""Which adapters' A rows sit in the hot rows of the stacked `[W; A_hot]` buffers, and where: a
contiguous block of `rank` hot rows per adapter, least recently used out first.

Pure bookkeeping (no torch): `HotSlots.place` says where a step's adapters go and which of them
must be copied in; hot_cache.py does the copies. An entry remembers the arena rows it was copied
from and when (the uploader's upload count), so rows rewritten since (an upload into them) make
it stale.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import NamedTuple

from lorasrv.ids import AdapterId


class HotEntry(NamedTuple):
    start: int  # first hot row; the adapter holds hot rows start .. start + len(rows) - 1
    rows: tuple[int, ...]  # the arena rows copied in, hot row start + i from rows[i]
    serial: int  # the uploader's upload count when the copy was issued


class Placement(NamedTuple):
    starts: dict[AdapterId, int]  # every wanted adapter's first hot row
    fills: list[tuple[int, tuple[int, ...]]]  # (first hot row, arena rows) to copy in now


class HotSlots:
    """`num_rows` hot rows shared by the adapters whose A rows were copied in, LRU."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.entries: OrderedDict[AdapterId, HotEntry] = OrderedDict()  # oldest use first

    def place(
        self,
        wanted: Mapping[AdapterId, tuple[int, ...]],
        serial: int,
        is_fresh: Callable[[HotEntry], bool],
    ) -> Placement | None:
        """Hot rows for every adapter of a step (adapter -> its arena rows now), or None when
        they do not fit together. Entries copied from other rows, or not `is_fresh`, are
        replaced; new ones are marked `serial`. Entries of other adapters are evicted least
        recently used first, only as far as room is needed."""
        if sum(len(rows) for rows in wanted.values()) > self.num_rows:
            return None
        missing = []
        for adapter_id, rows in wanted.items():
            entry = self.entries.get(adapter_id)
            if entry is not None and entry.rows == rows and is_fresh(entry):
                self.entries.move_to_end(adapter_id)
            else:
                self.entries.pop(adapter_id, None)
                missing.append(adapter_id)
        fills = []
        for adapter_id in missing:
            rows = wanted[adapter_id]
            start = self._room(len(rows), wanted)
            if start is None:  # fragmented: start over with only this step's adapters
                return self._repack(wanted, serial)
            self.entries[adapter_id] = HotEntry(start, rows, serial)
            fills.append((start, rows))
        return Placement({a: self.entries[a].start for a in wanted}, fills)

    def _room(self, size: int, keep: Mapping[AdapterId, object]) -> int | None:
        """The first free run of `size` hot rows, evicting unwanted entries oldest first."""
        while True:
            start = self._first_gap(size)
            if start is not None:
                return start
            victim = next((a for a in self.entries if a not in keep), None)
            if victim is None:
                return None
            del self.entries[victim]

    def _first_gap(self, size: int) -> int | None:
        end = 0
        for entry in sorted(self.entries.values()):
            if entry.start - end >= size:
                return end
            end = max(end, entry.start + len(entry.rows))
        return end if self.num_rows - end >= size else None

    def _repack(self, wanted: Mapping[AdapterId, tuple[int, ...]], serial: int) -> Placement:
        self.entries.clear()
        start, fills = 0, []
        for adapter_id, rows in wanted.items():
            self.entries[adapter_id] = HotEntry(start, rows, serial)
            fills.append((start, rows))
            start += len(rows)
        return Placement({a: self.entries[a].start for a in wanted}, fills)

    def check(self) -> None:
        """Entries inside the hot rows and disjoint (tests)."""
        end = 0
        for entry in sorted(self.entries.values()):
            assert entry.start >= end, "hot entries overlap"
            end = entry.start + len(entry.rows)
        assert end <= self.num_rows, "a hot entry past the hot rows"
