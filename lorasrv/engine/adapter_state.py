"""The adapter state machine: states, the one transition table, and the per-adapter entry.

Pure: imports only the stdlib, lorasrv.ids and lorasrv.messages; no asyncio, no torch.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple

from lorasrv.ids import AdapterId, OpId, RequestId, SlotId
from lorasrv.messages import (
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterOpDone,
    AdapterStatus,
    ClearSlot,
    LoadSlot,
    StepAdaptersReady,
)

logger = logging.getLogger(__name__)


class AdapterState(enum.Enum):
    LOADING = "loading"  # disk or Hub -> host memory
    CPU_LOADED = "cpu_loaded"  # host copy ready, no slot
    GPU_RESIDENT = "gpu_resident"  # in a slot; evictable when the latest prepared step skips it
    PINNED = "pinned"  # in a slot for good
    EVICTING = "evicting"  # leaving its slot (transient: see HOLDS_SLOT)
    UNLOADED = "unloaded"  # not in memory


S = AdapterState
NEXT: Final[Mapping[S, frozenset[S]]] = {
    S.UNLOADED: frozenset({S.LOADING}),
    # UNLOADED: the load failed, or it succeeded but the host cap had no room left (the adapter
    # stays registered and reloads on demand), or an unload came while a reload was in flight.
    S.LOADING: frozenset({S.CPU_LOADED, S.PINNED, S.UNLOADED}),
    # PINNED (addition): a pinned adapter whose slot had to wait for the next PrepareStep.
    # UNLOADED: dropped from host by the cap, or explicitly unloaded.
    S.CPU_LOADED: frozenset({S.GPU_RESIDENT, S.PINNED, S.UNLOADED}),
    S.GPU_RESIDENT: frozenset({S.EVICTING}),
    # CPU_LOADED: evicted from its slot; UNLOADED (addition): dropped by the cap, or unloaded.
    S.EVICTING: frozenset({S.CPU_LOADED, S.UNLOADED}),
    S.PINNED: frozenset({S.EVICTING}),  # only an explicit unload
}

#: States whose entry owns a slot. NOTE: EVICTING never outlives one registry call: the runner's
#: inbox is FIFO, so a slot can be reused as soon as its ClearSlot / next LoadSlot is queued.
HOLDS_SLOT: Final = frozenset({S.GPU_RESIDENT, S.PINNED, S.EVICTING})
#: States whose entry holds host weights (and so counts against max_loaded_loras).
HOLDS_WEIGHTS: Final = frozenset({S.CPU_LOADED, S.GPU_RESIDENT, S.PINNED, S.EVICTING})
#: States in which a request may take (and hold) a reference.
CAN_SERVE: Final = frozenset({S.CPU_LOADED, S.GPU_RESIDENT, S.PINNED})


class IllegalTransition(AssertionError):
    """A move outside `NEXT`: always a bug in the registry, never a user error."""


@dataclass(slots=True)
class AdapterEntry:
    """One loaded version of one adapter; owned by the registry, changed only through it."""

    name: str
    path: str  # as given to LoadAdapter; reloads resolve it again
    adapter_id: AdapterId
    pinned: bool
    state: AdapterState = AdapterState.UNLOADED
    slot: SlotId | None = None
    rank: int = 0
    refs: set[RequestId] = field(default_factory=set)  # requests holding a reference
    waiters: list[RequestId] = field(default_factory=list)  # acquires waiting for a reload
    weights: object | None = None  # opaque host copy (model.loader.AdapterWeights)
    last_used: int = 0  # registry clock at the last acquire/release/step: the LRU key
    loaded_order: int = 0  # registry clock when it last entered a slot: the FIFO key
    num_loads: int = 0  # successful host loads; 0 while the first load is in flight
    num_evictions: int = 0  # times forced out of a slot or out of host memory
    last_load_s: float = 0.0
    unloading: bool = False  # unload requested: no new acquires; removed when refs reach 0
    op_id: OpId | None = None  # the LoadAdapter op waiting for the first load

    def move_to(self, new: AdapterState) -> None:
        """The one place states change; anything outside NEXT is a bug."""
        if new not in NEXT[self.state]:
            raise IllegalTransition(
                f"adapter {self.name!r} (id {self.adapter_id}): {self.state.name} -> {new.name}"
            )
        logger.debug(
            "adapter %r (id %d): %s -> %s", self.name, self.adapter_id, self.state.name, new.name
        )
        self.state = new


class StartHostLoad(NamedTuple):
    """Effect: read `path` into host memory off the event loop, then report HostLoadDone."""

    adapter_id: AdapterId
    path: str


#: What a registry call asks the actor to do, in order: messages for its peers, and host loads.
Effect = (
    LoadSlot
    | ClearSlot
    | AdapterAcquired
    | AdapterAcquireFailed
    | StepAdaptersReady
    | AdapterOpDone
    | StartHostLoad
)


def not_found(request_id: RequestId, name: str, why: str) -> AdapterAcquireFailed:
    detail = f"adapter {name!r} {why}"
    return AdapterAcquireFailed(request_id=request_id, code="adapter_not_found", detail=detail)


def check_compatible(
    rank: int, modules: tuple[str, ...], *, max_rank: int, target_modules: tuple[str, ...]
) -> None:
    """Raise ValueError naming the flag to raise when an adapter does not fit the LoRA pool."""
    if rank > max_rank:
        raise ValueError(
            f"LoRA rank {rank} is greater than max_lora_rank {max_rank} (raise --max-lora-rank)"
        )
    outside = [m for m in modules if m not in target_modules]
    if outside:
        raise ValueError(
            f"module(s) {', '.join(outside)} are outside --lora-target-modules "
            f"({', '.join(target_modules) or 'none'})"
        )


# ----------------------------------------------------------------------------- over all entries


def num_pinned(entries: Iterable[AdapterEntry]) -> int:
    """Slots that pinned adapters hold, or take first at the next step."""
    return sum(e.pinned and e.state in (S.CPU_LOADED, S.PINNED, S.EVICTING) for e in entries)


def num_host_loaded(entries: Iterable[AdapterEntry]) -> int:
    """Host copies held, plus reloads in flight (a reload reserves its room when it starts)."""
    return sum(
        e.state in HOLDS_WEIGHTS or (e.state is S.LOADING and e.num_loads > 0) for e in entries
    )


def slot_victim(
    entries: Iterable[AdapterEntry], protected: frozenset[AdapterId], policy: Literal["lru", "fifo"]
) -> AdapterEntry | None:
    """The GPU_RESIDENT entry to evict by policy, outside the protected set; pinned never."""
    candidates = [e for e in entries if e.state is S.GPU_RESIDENT and e.adapter_id not in protected]
    if policy == "fifo":
        return min(candidates, key=lambda e: (e.loaded_order, e.adapter_id), default=None)
    return min(candidates, key=lambda e: (e.last_used, e.adapter_id), default=None)


def host_victim(
    entries: Iterable[AdapterEntry], protected: frozenset[AdapterId]
) -> AdapterEntry | None:
    """The least recently used host copy that nothing holds: unpinned, no refs, not unloading.

    NOTE: a victim has no refs, so no live request uses it. The latest step's entries are spared
    when possible, but not strictly: with an idle scheduler that stale set would otherwise block
    a waiting reload forever.
    """
    candidates = [
        e
        for e in entries
        if e.state in (S.CPU_LOADED, S.GPU_RESIDENT) and not (e.pinned or e.refs or e.unloading)
    ]
    return min(
        candidates,
        key=lambda e: (e.adapter_id in protected, e.last_used, e.adapter_id),
        default=None,
    )


def status_of(entry: AdapterEntry) -> AdapterStatus:
    return AdapterStatus(
        name=entry.name,
        path=entry.path,
        adapter_id=entry.adapter_id,
        state="unloading" if entry.unloading else entry.state.value,
        slot=entry.slot,
        rank=entry.rank,
        pinned=entry.pinned,
        num_refs=len(entry.refs),
        num_loads=entry.num_loads,
        num_evictions=entry.num_evictions,
        last_load_s=entry.last_load_s,
    )


def check_invariants(
    entries: Mapping[AdapterId, AdapterEntry],
    slots: Sequence[AdapterId | None],
    holders: Mapping[RequestId, AdapterId],
    *,
    max_pinned: int,
    max_loaded: int | None,
) -> None:
    """Raise AssertionError if the registry's entries, slot table and holders disagree."""
    for adapter_id, e in entries.items():
        where = f"adapter {e.name!r} (id {adapter_id}, {e.state.name})"
        assert e.adapter_id == adapter_id, where
        assert (e.slot is not None) == (e.state in HOLDS_SLOT), f"{where}: slot {e.slot}"
        assert e.slot is None or slots[e.slot] == adapter_id, f"{where}: slot table disagrees"
        assert e.state is not S.EVICTING, f"{where}: EVICTING outlived a registry call"
        assert (e.weights is not None) == (e.state in HOLDS_WEIGHTS), f"{where}: weights"
        assert e.pinned or e.state is not S.PINNED, where
        assert not (e.pinned and e.state is S.GPU_RESIDENT), where
        assert not e.refs or e.state in CAN_SERVE, f"{where}: referenced but not servable"
        # Waiters wait for a load in flight (first load or reload) or for host room to reload.
        waits_ok = e.state is S.LOADING or (e.state is S.UNLOADED and e.num_loads > 0)
        assert not e.waiters or waits_ok, f"{where}: waiters"
        assert not (e.unloading and e.waiters), f"{where}: unloading with waiters"
        assert not (e.unloading and not e.refs and e.state is not S.LOADING), f"{where}: drained"
        assert (e.op_id is not None) == (e.num_loads == 0), f"{where}: op id"
    for slot_id, owner in enumerate(slots):
        assert owner is None or entries[owner].slot == slot_id, f"slot {slot_id}"
    live = [e for e in entries.values() if not e.unloading]
    assert len({e.name for e in live}) == len(live), "two live entries share a name"
    assert sum(e.pinned for e in entries.values()) <= max_pinned, "too many pinned adapters"
    host = num_host_loaded(entries.values())
    assert max_loaded is None or host <= max_loaded, f"{host} host copies > {max_loaded}"
    if any(e.waiters and e.state is S.UNLOADED for e in entries.values()):  # waits for room
        assert max_loaded is not None, "a reload waits without a host cap"
        assert host >= max_loaded, "a reload waits with host room free"
        assert host_victim(entries.values(), frozenset()) is None, "a reload waits for a victim"
    held = {r: e.adapter_id for e in entries.values() for r in (*e.refs, *e.waiters)}
    assert held == dict(holders), "holders disagree with entries' refs and waiters"
