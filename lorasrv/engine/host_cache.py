"""Host copies: which adapter versions have a host copy at the runner (or one on its way from
disk), under `--max-loaded-loras`. Pure: stdlib and lorasrv.ids only.

One of the three owners of adapter memory (names: adapter_catalog.py; GPU rows: the scheduler's
residency.py). The runner holds the copies themselves (HostCopyReady / HostCopyDropped); this
table decides which. An absent version has no entry.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
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
    """Counts and the LRU order are kept as entries change, so each call is O(1) (a thousand
    registered adapters load, acquire and release without quadratic work)."""

    def __init__(self, max_loaded: int | None) -> None:
        self.max_loaded = max_loaded
        self.entries: dict[AdapterId, HostEntry] = {}
        self.room_queue: list[AdapterId] = []  # absent versions whose waiters need room, FIFO
        self._clock = 0
        self._num_held = 0
        self._lru: OrderedDict[AdapterId, None] = OrderedDict()  # loaded copies, LRU first

    def state(self, adapter_id: AdapterId) -> HostState | None:
        entry = self.entries.get(adapter_id)
        return None if entry is None else entry.state

    def num_held(self) -> int:
        """Copies held, plus reloads in flight (they reserved their room)."""
        return self._num_held

    def has_room(self) -> bool:
        return self.max_loaded is None or self.num_held() < self.max_loaded

    def start_load(self, adapter_id: AdapterId, *, is_reload: bool) -> None:
        assert adapter_id not in self.entries, f"adapter id {adapter_id} loads twice"
        self.entries[adapter_id] = HostEntry(HostState.LOADING, is_reload, self._tick())
        self._num_held += is_reload

    def loaded(self, adapter_id: AdapterId) -> None:
        entry = self.entries[adapter_id]
        assert HostState.LOADED in NEXT[entry.state], f"adapter id {adapter_id}: loaded twice"
        self._num_held += not entry.is_reload  # a reload reserved its room when it started
        entry.state = HostState.LOADED
        entry.is_reload = False
        entry.last_used = self._tick()
        self._lru[adapter_id] = None

    def drop(self, adapter_id: AdapterId) -> None:
        entry = self.entries.pop(adapter_id)
        self._num_held -= entry.state is HostState.LOADED or entry.is_reload
        self._lru.pop(adapter_id, None)

    def touch(self, adapter_id: AdapterId) -> None:
        entry = self.entries.get(adapter_id)
        if entry is not None:
            entry.last_used = self._tick()
            if adapter_id in self._lru:
                self._lru.move_to_end(adapter_id)

    def victim(self, can_drop: Callable[[AdapterId], bool]) -> AdapterId | None:
        """The least recently used loaded copy that `can_drop` allows."""
        return next((a for a in self._lru if can_drop(a)), None)

    def check_invariants(self, can_drop: Callable[[AdapterId], bool]) -> None:
        slow = sum(e.state is HostState.LOADED or e.is_reload for e in self.entries.values())
        assert self._num_held == slow, f"held count {self._num_held} != {slow}"
        loaded = sorted(
            (e.last_used, a) for a, e in self.entries.items() if e.state is HostState.LOADED
        )
        assert list(self._lru) == [a for _, a in loaded], "LRU order"
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
