"""Host copies: which adapter versions have a host copy at the runner (or one on its way from
disk), under `--max-loaded-loras`. Pure: stdlib and lorasrv.ids only.

One of the three owners of adapter memory (names: adapter_catalog.py; GPU rows: the scheduler's
residency.py). The runner holds the copies themselves (HostCopyReady / HostCopyDropped); this
table decides which. An absent version has no entry.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from lorasrv.ids import AdapterId


class HostState(enum.Enum):
    LOADING = "loading"  # disk -> host in flight (a first load, or a reload)
    LOADED = "loaded"  # the runner holds the host copy


#: Entering the table is LOADING; leaving it (drop, failed load) is allowed from any state.
NEXT: Final[Mapping[HostState, frozenset[HostState]]] = {
    HostState.LOADING: frozenset({HostState.LOADED}),
    HostState.LOADED: frozenset(),
}


@dataclass(slots=True)
class HostEntry:
    state: HostState
    is_reload: bool  # a reload reserves its room under the cap when it starts
    last_used: int  # cache clock at the last acquire or release: the LRU key


class HostCache:
    def __init__(self, max_loaded: int | None) -> None:
        self.max_loaded = max_loaded
        self.entries: dict[AdapterId, HostEntry] = {}
        self.room_queue: list[AdapterId] = []  # absent versions whose waiters need room, FIFO
        self._clock = 0

    def state(self, adapter_id: AdapterId) -> HostState | None:
        entry = self.entries.get(adapter_id)
        return None if entry is None else entry.state

    def num_held(self) -> int:
        """Copies held, plus reloads in flight (they reserved their room)."""
        return sum(e.state is HostState.LOADED or e.is_reload for e in self.entries.values())

    def has_room(self) -> bool:
        return self.max_loaded is None or self.num_held() < self.max_loaded

    def start_load(self, adapter_id: AdapterId, *, is_reload: bool) -> None:
        assert adapter_id not in self.entries, f"adapter id {adapter_id} loads twice"
        self.entries[adapter_id] = HostEntry(HostState.LOADING, is_reload, self._tick())

    def loaded(self, adapter_id: AdapterId) -> None:
        entry = self.entries[adapter_id]
        assert HostState.LOADED in NEXT[entry.state], f"adapter id {adapter_id}: loaded twice"
        entry.state = HostState.LOADED
        entry.is_reload = False
        entry.last_used = self._tick()

    def drop(self, adapter_id: AdapterId) -> None:
        del self.entries[adapter_id]

    def touch(self, adapter_id: AdapterId) -> None:
        entry = self.entries.get(adapter_id)
        if entry is not None:
            entry.last_used = self._tick()

    def victim(self, can_drop: Callable[[AdapterId], bool]) -> AdapterId | None:
        """The least recently used loaded copy that `can_drop` allows."""
        loaded = [
            (e.last_used, a)
            for a, e in self.entries.items()
            if e.state is HostState.LOADED and can_drop(a)
        ]
        return min(loaded)[1] if loaded else None

    def check_invariants(self, can_drop: Callable[[AdapterId], bool]) -> None:
        held = self.num_held()
        assert self.max_loaded is None or held <= self.max_loaded, f"{held} host copies > cap"
        assert len(set(self.room_queue)) == len(self.room_queue), "queued twice for room"
        if self.room_queue:  # someone waits for room: there is none, and no victim either
            assert not self.has_room(), "a reload waits with host room free"
            assert self.victim(can_drop) is None, "a reload waits although a copy could go"
        for adapter_id in self.room_queue:
            assert adapter_id not in self.entries, f"adapter id {adapter_id} queued but loading"

    def _tick(self) -> int:
        self._clock += 1
        return self._clock
