"""Names and versions: which adapter versions exist, which name each live one answers to, and
which requests hold or wait for each. Pure: stdlib and lorasrv.ids only.

One of the three owners of adapter memory (host copies: host_cache.py; GPU rows: the scheduler's
residency.py). A version's phase changes only through `move_to`, against NEXT.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from lorasrv.ids import AdapterId, OpId, RequestId

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    LOADING = "loading"  # first load in flight: answers to its name, serves nobody yet
    READY = "ready"  # serves requests (its host copy may come and go: host_cache.py)
    UNLOADING = "unloading"  # unload asked: no new requests; removed when none holds it


#: Removal from the catalog is not a phase: LOADING leaves when the first load fails,
#: UNLOADING when its last request lets go.
NEXT: Final[Mapping[Phase, frozenset[Phase]]] = {
    Phase.LOADING: frozenset({Phase.READY}),
    Phase.READY: frozenset({Phase.UNLOADING}),
    Phase.UNLOADING: frozenset(),
}


class IllegalTransition(AssertionError):
    """A move outside NEXT: always a bug, never a user error."""


@dataclass(slots=True)
class AdapterVersion:
    """One load of one adapter name; its id is never reused, so nothing cached for it (prefix
    KV, GPU rows) can leak into a later version."""

    name: str
    path: str  # as given to LoadAdapter; reloads resolve it again
    adapter_id: AdapterId
    pinned: bool
    phase: Phase = Phase.LOADING
    rank: int = 0  # rows it needs on the GPU (its max rank over modules)
    scaling: float = 0.0
    refs: set[RequestId] = field(default_factory=set)  # requests holding a reference
    waiters: list[RequestId] = field(default_factory=list)  # acquires waiting for its host copy
    op_id: OpId | None = None  # the LoadAdapter waiting for the first load
    num_loads: int = 0  # successful host loads; 0 while the first load is in flight
    num_host_drops: int = 0  # host copies dropped by --max-loaded-loras
    last_load_s: float = 0.0

    def move_to(self, new: Phase) -> None:
        if new not in NEXT[self.phase]:
            raise IllegalTransition(
                f"adapter {self.name!r} (id {self.adapter_id}): {self.phase.name} -> {new.name}"
            )
        logger.debug("adapter %r (id %d): %s", self.name, self.adapter_id, new.value)
        self.phase = new


class AdapterCatalog:
    def __init__(self) -> None:
        self.versions: dict[AdapterId, AdapterVersion] = {}
        self.by_name: dict[str, AdapterVersion] = {}  # live versions (not unloading)
        self.holders: dict[RequestId, AdapterId] = {}  # requests holding or waiting
        self._next_id = 1

    def add(self, name: str, path: str, *, pinned: bool, op_id: OpId) -> AdapterVersion:
        version = AdapterVersion(name, path, AdapterId(self._next_id), pinned, op_id=op_id)
        self._next_id += 1  # NOTE: never reused (see AdapterVersion)
        self.versions[version.adapter_id] = self.by_name[name] = version
        return version

    def stop_new_requests(self, version: AdapterVersion) -> None:
        """READY -> UNLOADING: its name is free for a new version at once."""
        del self.by_name[version.name]
        version.move_to(Phase.UNLOADING)

    def remove(self, version: AdapterVersion) -> None:
        assert not version.refs, f"{version.name!r} removed while held"
        assert not version.waiters, f"{version.name!r} removed while awaited"
        del self.versions[version.adapter_id]
        if self.by_name.get(version.name) is version:
            del self.by_name[version.name]

    def hold(self, version: AdapterVersion, request_id: RequestId) -> None:
        assert request_id not in self.holders, f"request {request_id!r} acquired twice"
        version.refs.add(request_id)
        self.holders[request_id] = version.adapter_id

    def wait(self, version: AdapterVersion, request_id: RequestId) -> None:
        assert request_id not in self.holders, f"request {request_id!r} acquired twice"
        version.waiters.append(request_id)
        self.holders[request_id] = version.adapter_id

    def let_go(self, request_id: RequestId) -> None:
        """Forget a holder or waiter (the caller updates the version's refs or waiters)."""
        del self.holders[request_id]

    def num_pinned(self) -> int:
        """Pinned versions, draining ones included (they keep their memory until released)."""
        return sum(v.pinned for v in self.versions.values())

    def check_invariants(self, *, max_pinned: int) -> None:
        for adapter_id, v in self.versions.items():
            where = f"adapter {v.name!r} (id {adapter_id}, {v.phase.name})"
            assert v.adapter_id == adapter_id, where
            assert (self.by_name.get(v.name) is v) == (v.phase is not Phase.UNLOADING), where
            assert (v.op_id is not None) == (v.phase is Phase.LOADING), f"{where}: op id"
            assert (v.num_loads == 0) == (v.phase is Phase.LOADING), f"{where}: loads"
            assert not (v.refs and v.phase is Phase.LOADING), f"{where}: held while loading"
            assert not (v.waiters and v.phase is Phase.UNLOADING), f"{where}: waits to unload"
            assert not set(v.refs) & set(v.waiters), f"{where}: holds and waits"
        assert all(v.name == name for name, v in self.by_name.items()), "by_name keys"
        held = {r: v.adapter_id for v in self.versions.values() for r in (*v.refs, *v.waiters)}
        assert held == self.holders, "holders disagree with refs and waiters"
        assert self.num_pinned() <= max_pinned, "too many pinned adapters"
