"""GPU residency: which adapters hold which arena rows. Pure; owned by the scheduler's planner,
which consults it synchronously while it builds each step.

An adapter of rank r holds exactly r rows (any r rows: no fragmentation). Idle adapters (used by
no running sequence, not in the latest plan, not pinned) are evicted by policy when rows or KV
pages are needed; pinned ones stay once placed. Retired adapters (unloaded for good) free their
rows at the next plan.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Literal

from lorasrv.engine.arena import Arena
from lorasrv.ids import AdapterId


@dataclass(slots=True)
class Resident:
    adapter_id: AdapterId
    rows: tuple[int, ...]
    pinned: bool
    last_used: int  # residency clock when a plan last used it: the LRU key
    loaded_order: int  # residency clock when it was placed: the FIFO key


class Residency:
    def __init__(
        self,
        arena: Arena,
        policy: Literal["lru", "fifo"],
        reclaim_rows: Callable[[int], None] | None = None,
    ) -> None:
        self.arena = arena
        self.policy = policy
        # Frees up to n reclaimable rows (the prefix cache gives back the pages under them).
        self._reclaim_rows = reclaim_rows
        self.entries: dict[AdapterId, Resident] = {}
        self.num_evictions: Counter[AdapterId] = Counter()  # GPU evictions per adapter id
        self.retired: set[AdapterId] = set()  # unloaded for good; rows freed at the next plan
        self.version = 0  # bumps on every change, so a stats snapshot is rebuilt only then
        self.num_unpinned_rows = 0  # rows of resident adapters that may be evicted when idle
        self._clock = 0

    # ------------------------------------------------------------------ queries

    def rows_of(self, adapter_id: AdapterId) -> tuple[int, ...] | None:
        entry = self.entries.get(adapter_id)
        return None if entry is None else entry.rows

    def is_resident(self, adapter_id: AdapterId) -> bool:
        return adapter_id in self.entries

    def victims(
        self, protected: Collection[AdapterId], wanted: Collection[AdapterId] = ()
    ) -> list[Resident]:
        """Idle adapters in eviction order: those no waiting request wants first, then by
        policy (LRU: least recently used; FIFO: placed first). Pinned and protected never."""
        candidates = [
            e for e in self.entries.values() if not e.pinned and e.adapter_id not in protected
        ]
        if self.policy == "fifo":
            candidates.sort(key=lambda e: (e.adapter_id in wanted, e.loaded_order, e.adapter_id))
        else:
            candidates.sort(key=lambda e: (e.adapter_id in wanted, e.last_used, e.adapter_id))
        return candidates

    def obtainable_rows(self, protected: Collection[AdapterId]) -> int:
        """Rows free now, over evictable cached pages only, and those of every idle adapter.
        O(len(protected)): the planner asks for every waiting request of a plan."""
        held = self.num_unpinned_rows
        for adapter_id in protected:
            entry = self.entries.get(adapter_id)
            if entry is not None and not entry.pinned:
                held -= len(entry.rows)
        return self.arena.num_free_rows + self._reclaimable_rows + held

    @property
    def _reclaimable_rows(self) -> int:
        return self.arena.num_reclaimable_rows if self._reclaim_rows is not None else 0

    # ------------------------------------------------------------------ changes

    def touch(self, adapter_id: AdapterId) -> None:
        self._clock += 1
        self.entries[adapter_id].last_used = self._clock

    def place(
        self,
        adapter_id: AdapterId,
        rank: int,
        *,
        pinned: bool,
        protected: Collection[AdapterId],
        wanted: Collection[AdapterId] = (),
        may_evict_wanted: bool = True,
    ) -> tuple[int, ...] | None:
        """Give `adapter_id` `rank` rows: free rows, else rows over evictable cached pages
        (unless `may_evict_wanted` is off: a prefetch), else the rows of idle adapters by
        policy. None (and nothing evicted) when even that is not enough."""
        assert adapter_id not in self.entries, f"adapter id {adapter_id} placed twice"
        assert adapter_id not in self.retired, f"adapter id {adapter_id} is retired"
        missing = rank - self.arena.num_free_rows
        if missing > 0:  # NOTE: only then the victims' sort (prefetch places many a plan)
            cached = min(missing, self._reclaimable_rows) if may_evict_wanted else 0
            victims: list[Resident] = []
            if missing > cached:
                victims = self.victims(protected, wanted)
                if not may_evict_wanted:
                    victims = [v for v in victims if v.adapter_id not in wanted]
                if missing - cached > sum(len(v.rows) for v in victims):
                    return None
            if cached and self._reclaim_rows is not None:
                self._reclaim_rows(cached)
            for victim in _enough(victims, rank - self.arena.num_free_rows):
                self.evict(victim.adapter_id)
        rows = self.arena.allocate_rows(rank)
        self._clock += 1
        self.entries[adapter_id] = Resident(adapter_id, rows, pinned, self._clock, self._clock)
        self.num_unpinned_rows += 0 if pinned else rank
        self.version += 1
        return rows

    def evict(self, adapter_id: AdapterId) -> None:
        entry = self.entries.pop(adapter_id)
        assert not entry.pinned, f"pinned adapter id {adapter_id} evicted"
        self.arena.free_rows(entry.rows)
        self.num_unpinned_rows -= len(entry.rows)
        self.num_evictions[adapter_id] += 1
        self.version += 1

    def reclaim_pages(
        self, num: int, protected: Collection[AdapterId], wanted: Collection[AdapterId] = ()
    ) -> bool:
        """Evict idle adapters whose rows lie over KV's share until `num` pages are free
        (KV demand comes before idle adapters); True if they are."""
        for victim in self.victims(protected, wanted):
            if self.arena.can_allocate(num):
                break
            if self.arena.rows_free_pages(victim.rows):
                self.evict(victim.adapter_id)
        return self.arena.can_allocate(num)

    def retire(self, adapter_id: AdapterId) -> None:
        """Unloaded for good: its rows go at the next `free_retired` (nothing plans with it)."""
        self.retired.add(adapter_id)
        self.num_evictions.pop(adapter_id, None)
        self.version += 1

    def free_retired(self, protected: Collection[AdapterId]) -> None:
        for adapter_id in [a for a in self.retired if a not in protected]:
            self.retired.discard(adapter_id)
            entry = self.entries.pop(adapter_id, None)
            if entry is not None:
                self.arena.free_rows(entry.rows)
                self.num_unpinned_rows -= 0 if entry.pinned else len(entry.rows)
                self.version += 1

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """Rows belong to one adapter each and match the arena's count of used rows."""
        seen: set[int] = set()
        for adapter_id, entry in self.entries.items():
            assert entry.adapter_id == adapter_id, f"entry {adapter_id} is keyed wrong"
            assert entry.rows, f"adapter id {adapter_id} resident with no rows"
            assert not seen & set(entry.rows), f"adapter id {adapter_id} shares a row"
            seen |= set(entry.rows)
        assert len(seen) == self.arena.num_used_rows, "rows held by nobody, or by two"
        unpinned = sum(len(e.rows) for e in self.entries.values() if not e.pinned)
        assert unpinned == self.num_unpinned_rows, "unpinned row count"


def _enough(victims: list[Resident], missing: int) -> Iterator[Resident]:
    """Victims in order until their rows cover `missing`."""
    for victim in victims:
        if missing <= 0:
            return
        missing -= len(victim.rows)
        yield victim
