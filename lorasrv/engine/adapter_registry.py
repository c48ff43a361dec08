"""AdapterRegistry: every adapter rule (loads, references, slots, host cap, unload) as methods.

Pure: no I/O, no asyncio, no torch. Each method returns the effects (messages to send,
StartHostLoad) for the actor to carry out, in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from lorasrv.config import AdapterConfig, adapter_name_problem
from lorasrv.engine.adapter_state import (
    CAN_SERVE,
    AdapterEntry,
    AdapterState,
    Effect,
    StartHostLoad,
    check_invariants,
    host_victim,
    not_found,
    num_host_loaded,
    num_pinned,
    slot_victim,
    status_of,
)
from lorasrv.ids import AdapterId, OpId, RequestId, SlotId, StepId
from lorasrv.messages import (
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterOpDone,
    AdapterStatus,
    ClearSlot,
    LoadSlot,
    SlotAssignment,
    StepAdaptersReady,
)

S = AdapterState
logger = logging.getLogger(__name__)


class AdapterRegistry:
    """Entries keyed by adapter id (so a draining old version never meets a new one by name)."""

    def __init__(self, cfg: AdapterConfig, num_slots: int) -> None:
        self.num_slots = num_slots
        self.max_pinned = max(0, min(cfg.max_loras_per_batch, num_slots) - 1)
        self.max_loaded = cfg.max_loaded_loras
        self.policy = cfg.lora_eviction_policy
        self.entries: dict[AdapterId, AdapterEntry] = {}
        self.by_name: dict[str, AdapterEntry] = {}  # not unloading; new acquires look here
        self.slots: list[AdapterId | None] = [None] * num_slots
        self.protected: frozenset[AdapterId] = frozenset()  # the latest prepared step's ids
        self._holders: dict[RequestId, AdapterId] = {}  # holding or waiting requests
        self._room_queue: list[AdapterId] = []  # UNLOADED entries with waiters, oldest first
        self._next_id = 1
        self._clock = 0
        self._out: list[Effect] = []

    # ------------------------------------------------------------------ queries

    def loaded_adapters(self) -> dict[str, str]:
        return {name: e.path for name, e in self.by_name.items() if e.num_loads > 0}

    def num_pinned(self) -> int:
        return num_pinned(self.entries.values())

    def describe(self) -> tuple[AdapterStatus, ...]:
        return tuple(status_of(e) for e in self.entries.values())

    def check_invariants(self) -> None:
        check_invariants(
            self.entries,
            self.slots,
            self._holders,
            max_pinned=self.max_pinned,
            max_loaded=self.max_loaded,
        )

    # ------------------------------------------------------------------ admin operations

    def begin_load(self, op_id: OpId, name: str, path: str, pinned: bool) -> list[Effect]:
        problem = adapter_name_problem(name)
        if problem is not None:
            self._op_done(op_id, problem)
        elif name in self.by_name:
            self._op_done(op_id, f"adapter {name!r} is already loaded; unload it first")
        # Draining pinned adapters count too: they keep their slot until released.
        elif pinned and sum(e.pinned for e in self.entries.values()) >= self.max_pinned:
            self._op_done(
                op_id,
                f"cannot pin adapter {name!r}: at most --max-loras-per-batch - 1 = "
                f"{self.max_pinned} adapters may be pinned (so unpinned requests never starve)",
            )
        else:
            entry = AdapterEntry(
                name=name, path=path, adapter_id=AdapterId(self._next_id), pinned=pinned
            )
            entry.op_id = op_id
            self._next_id += 1  # NOTE: never reused, so nothing cached for an old version leaks
            self.entries[entry.adapter_id] = self.by_name[name] = entry
            entry.move_to(S.LOADING)
            self._out.append(StartHostLoad(entry.adapter_id, path))
        return self._flush()

    def finish_load(
        self, adapter_id: AdapterId, weights: object, rank: int, load_s: float
    ) -> list[Effect]:
        entry = self.entries[adapter_id]
        entry.rank, entry.last_load_s, entry.last_used = rank, load_s, self._tick()
        # NOTE: a reload reserved its host room when it started; a first load makes room now,
        # before num_loads counts it as a reload.
        has_room = entry.num_loads > 0 or entry.unloading or self._make_host_room()
        entry.num_loads += 1
        op_id, entry.op_id, error = entry.op_id, None, None
        if entry.unloading:  # unloaded while its reload was in flight
            self._remove(entry)
        elif has_room:
            entry.weights = weights
            if not (entry.pinned and self._place(entry)):
                entry.move_to(S.CPU_LOADED)
            for request_id in entry.waiters:
                self._grant(entry, request_id)
            entry.waiters.clear()
        elif entry.pinned:  # a pinned adapter must stay in memory: refuse it
            error = (
                f"no host memory left for pinned adapter {entry.name!r}; raise --max-loaded-loras"
            )
            self._fail_waiters(entry, "adapter_not_found", error)  # it is gone: 404
            self._remove(entry)
        else:  # registered, but the host cap had no victim: it reloads on first use
            logger.info(
                "adapter %r (id %d) loaded, then dropped by the host cap", entry.name, adapter_id
            )
            entry.move_to(S.UNLOADED)
            if entry.waiters:  # requests that came during the load wait for host room
                self._room_queue.append(entry.adapter_id)
        self._op_done(op_id, error)
        self._serve_room_queue()
        return self._flush()

    def fail_load(self, adapter_id: AdapterId, error: str) -> list[Effect]:
        entry = self.entries[adapter_id]
        detail = f"failed to load adapter {entry.name!r} from {entry.path!r}: {error}"
        # NOTE: a request is not at fault for its adapter's load: never a 400 for it
        if entry.num_loads == 0 or entry.unloading:  # a failed first load leaves no trace
            self._fail_waiters(entry, "adapter_not_found", detail)
            self._remove(entry)
            self._op_done(entry.op_id, detail)
        else:  # a failed reload: the adapter stays registered; the next acquire retries (503)
            entry.move_to(S.UNLOADED)
            self._fail_waiters(entry, "adapter_unavailable", detail)
        self._serve_room_queue()
        return self._flush()

    def unload(self, op_id: OpId, name: str) -> list[Effect]:
        entry = self.by_name.get(name)
        if entry is None:
            self._op_done(op_id, f"adapter {name!r} is not loaded")
        elif entry.num_loads == 0:
            self._op_done(op_id, f"adapter {name!r} is still loading; unload it once loaded")
        else:
            # NOTE: stop new acquires at once; the entry, keyed by id, drains on its own.
            del self.by_name[name]
            entry.unloading = True
            self._fail_waiters(entry, "adapter_not_found", f"adapter {name!r} was unloaded")
            self._finish_unload_if_drained(entry)
            self._op_done(op_id)
            self._serve_room_queue()
        return self._flush()

    # ------------------------------------------------------------------ requests

    def acquire(self, request_id: RequestId, name: str) -> list[Effect]:
        assert request_id not in self._holders, f"request {request_id!r} acquired twice"
        entry = self.by_name.get(name)
        if entry is None:
            self._out.append(not_found(request_id, name, "is not loaded"))
        elif entry.state in CAN_SERVE:
            self._grant(entry, request_id)
        else:  # first load or reload in flight (LOADING), or dropped by the host cap (UNLOADED)
            entry.waiters.append(request_id)
            self._holders[request_id] = entry.adapter_id
            if entry.state is S.UNLOADED and entry.adapter_id not in self._room_queue:
                self._room_queue.append(entry.adapter_id)
                self._serve_room_queue()
        return self._flush()

    def release(self, request_id: RequestId, adapter_id: AdapterId) -> list[Effect]:
        entry = self.entries.get(adapter_id)
        assert entry is not None, f"release of {request_id!r}: unknown adapter id {adapter_id}"
        assert request_id in entry.refs, f"{request_id!r} released twice, or never acquired"
        entry.refs.remove(request_id)
        del self._holders[request_id]
        entry.last_used = self._tick()
        self._finish_unload_if_drained(entry)
        self._serve_room_queue()
        return self._flush()

    def prepare_step(self, step_id: StepId, adapter_ids: Iterable[AdapterId]) -> list[Effect]:
        """Put the step's adapters into slots: pending pinned first, then each id in order.

        NOTE: the runner's inbox is FIFO. The LoadSlot effects are sent before the reply, and the
        scheduler sends this step's RunStep only after the reply, so uploads land first. A slot
        used by the step already in flight may be evicted: that RunStep was queued before this
        PrepareStep was sent. So only the latest prepared set must be protected.
        """
        wanted = tuple(dict.fromkeys(adapter_ids))
        self.protected = frozenset(wanted)
        for pending in list(self.entries.values()):
            if pending.pinned and pending.state is S.CPU_LOADED and not pending.unloading:
                self._place(pending)
        placed: list[SlotAssignment] = []
        deferred: list[AdapterId] = []
        for adapter_id in wanted:
            entry = self.entries.get(adapter_id)
            if entry is None or entry.state not in CAN_SERVE:
                logger.warning(
                    "step %d wants adapter id %d, which is not loaded", step_id, adapter_id
                )
                deferred.append(adapter_id)
                continue
            entry.last_used = self._tick()
            if entry.slot is None and not self._place(entry):
                deferred.append(adapter_id)
                continue
            assert entry.slot is not None
            placed.append(SlotAssignment(adapter_id, entry.slot))
        self._out.append(
            StepAdaptersReady(
                step_id=step_id,
                slots=tuple(placed),
                deferred=tuple(deferred),
                num_pinned=self.num_pinned(),
            )
        )
        return self._flush()

    # ------------------------------------------------------------------ rules

    def _grant(self, entry: AdapterEntry, request_id: RequestId) -> None:
        entry.refs.add(request_id)
        self._holders[request_id] = entry.adapter_id
        entry.last_used = self._tick()
        self._out.append(
            AdapterAcquired(
                request_id=request_id,
                adapter_id=entry.adapter_id,
                pinned=entry.pinned,
                num_pinned=self.num_pinned(),
            )
        )

    def _fail_waiters(self, entry: AdapterEntry, code: str, detail: str) -> None:
        for request_id in entry.waiters:
            del self._holders[request_id]
            self._out.append(AdapterAcquireFailed(request_id=request_id, code=code, detail=detail))
        entry.waiters.clear()

    def _place(self, entry: AdapterEntry) -> bool:
        """Upload `entry` into a free slot, else into the slot of a victim; False if none."""
        slot = next((SlotId(i) for i, a in enumerate(self.slots) if a is None), None)
        if slot is None:
            victim = slot_victim(self.entries.values(), self.protected, self.policy)
            if victim is None:
                return False
            slot = self._leave_slot(victim, S.CPU_LOADED)
            victim.num_evictions += 1
        entry.move_to(S.PINNED if entry.pinned else S.GPU_RESIDENT)
        entry.slot, self.slots[slot] = slot, entry.adapter_id
        entry.loaded_order = self._tick()
        self._out.append(LoadSlot(slot_id=slot, adapter_id=entry.adapter_id, weights=entry.weights))
        return True

    def _leave_slot(self, entry: AdapterEntry, to: AdapterState) -> SlotId:
        """GPU_RESIDENT/PINNED -> EVICTING -> `to`; returns the freed slot."""
        slot = entry.slot
        assert slot is not None
        entry.move_to(S.EVICTING)
        entry.move_to(to)
        entry.slot, self.slots[slot] = None, None
        logger.debug("adapter %r (id %d) left slot %d", entry.name, entry.adapter_id, slot)
        return slot

    def _make_host_room(self) -> bool:
        """Make room for one more host copy under max_loaded_loras; False if no victim exists."""
        if self.max_loaded is None or num_host_loaded(self.entries.values()) < self.max_loaded:
            return True
        victim = host_victim(self.entries.values(), self.protected)
        if victim is None:
            return False
        logger.info(
            "host cap: dropping adapter %r (id %d) from host", victim.name, victim.adapter_id
        )
        if victim.slot is None:
            victim.move_to(S.UNLOADED)
        else:
            self._out.append(ClearSlot(slot_id=self._leave_slot(victim, S.UNLOADED)))
        victim.weights = None
        victim.num_evictions += 1
        return True

    def _serve_room_queue(self) -> None:
        """Start reloads for waiting acquires, oldest first, while the host cap has room."""
        while self._room_queue:
            entry = self.entries.get(self._room_queue[0])
            if entry is not None and entry.state is S.UNLOADED and entry.waiters:
                if not self._make_host_room():
                    return
                entry.move_to(S.LOADING)
                self._out.append(StartHostLoad(entry.adapter_id, entry.path))
            self._room_queue.pop(0)

    def _finish_unload_if_drained(self, entry: AdapterEntry) -> None:
        # NOTE: with no refs no live request uses it, so the protected set need not hold it.
        if entry.unloading and not entry.refs and entry.state is not S.LOADING:
            self._remove(entry)
            logger.info("adapter %r (id %d) unloaded", entry.name, entry.adapter_id)

    def _remove(self, entry: AdapterEntry) -> None:
        """Out of the registry for good (slot cleared, weights dropped); the state ends UNLOADED."""
        if entry.slot is not None:
            self._out.append(ClearSlot(slot_id=self._leave_slot(entry, S.UNLOADED)))
        elif entry.state is not S.UNLOADED:
            entry.move_to(S.UNLOADED)
        entry.weights = None
        del self.entries[entry.adapter_id]
        if entry.adapter_id in self._room_queue:
            self._room_queue.remove(entry.adapter_id)
        if self.by_name.get(entry.name) is entry:
            del self.by_name[entry.name]

    def _op_done(self, op_id: OpId | None, error: str | None = None) -> None:
        if op_id is not None:
            self._out.append(
                AdapterOpDone(
                    op_id=op_id,
                    success=error is None,
                    error_message=error or "",
                    loaded_adapters=self.loaded_adapters(),
                )
            )

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _flush(self) -> list[Effect]:
        out, self._out = self._out, []
        return out
