"""AdapterRegistry: the adapter manager's rules (loads, references, the host cap, unload) over
its two tables, the catalog (names, versions, holders) and the host cache (host copies).

Pure: no I/O, no asyncio, no torch. Each method returns the effects (messages to send,
StartHostLoad) for the actor to carry out, in order. GPU rows are not here: the scheduler's
planner owns them, and learns of a version's end through AdapterRetired.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from lorasrv.config import AdapterConfig, adapter_name_problem
from lorasrv.engine.adapter_catalog import AdapterCatalog, AdapterVersion, Phase
from lorasrv.engine.adapter_status import status_of
from lorasrv.engine.host_cache import HostCache, HostState
from lorasrv.ids import AdapterId, OpId, RequestId
from lorasrv.messages import (
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterOpDone,
    AdapterRetired,
    AdapterStatus,
    HostCopy,
    HostCopyDropped,
    HostCopyReady,
)

logger = logging.getLogger(__name__)


class StartHostLoad(NamedTuple):
    """Effect: read `path` into host memory off the event loop, then report HostLoadDone."""

    adapter_id: AdapterId
    path: str


#: What a registry call asks the actor to do, in order: messages for its peers, and host loads.
Effect = (
    HostCopyReady
    | HostCopyDropped
    | AdapterAcquired
    | AdapterAcquireFailed
    | AdapterRetired
    | AdapterOpDone
    | StartHostLoad
)


class AdapterRegistry:
    def __init__(self, cfg: AdapterConfig, *, capacity: int) -> None:
        """`capacity`: distinct adapters a batch may hold (planner.lora_capacity)."""
        self.capacity = capacity
        self.catalog = AdapterCatalog()
        self.host = HostCache(cfg.max_loaded_loras)
        # Pinned adapters keep their GPU rows and host copies: leave room for one more in a
        # batch and in host memory, so unpinned requests never starve.
        limits = [(capacity, "the adapters a batch holds at --max-lora-rank")]
        if cfg.max_loras_per_batch is not None and cfg.max_loras_per_batch <= capacity:
            limits = [(cfg.max_loras_per_batch, "--max-loras-per-batch")]
        if cfg.max_loaded_loras is not None:
            limits.append((cfg.max_loaded_loras, "--max-loaded-loras"))
        limit, self._pin_limit = min(limits, key=lambda limit: limit[0])  # ties: the first
        self.max_pinned = max(0, limit - 1)
        self._out: list[Effect] = []
        self._loaded: dict[str, str] = {}  # name -> path of each ready version (kept as it changes)

    # ------------------------------------------------------------------ queries

    def loaded_adapters(self) -> dict[str, str]:
        """Name -> path of every version that serves requests (a copy: O(n) in C, not Python)."""
        return dict(self._loaded)

    def describe(self, names: tuple[str, ...] | None = None) -> tuple[AdapterStatus, ...]:
        """Every version; with `names`, only the live versions of those names."""
        host = self.host.state
        if names is None:
            versions = list(self.catalog.versions.values())
        else:
            versions = [self.catalog.by_name[n] for n in names if n in self.catalog.by_name]
        return tuple(status_of(v, host(v.adapter_id)) for v in versions)

    def check_invariants(self) -> None:
        self.catalog.check_invariants(max_pinned=self.max_pinned)
        ready = {name: v.path for name, v in self.catalog.by_name.items() if v.num_loads > 0}
        assert self._loaded == ready, "loaded adapters out of date"
        self.host.check_invariants(self._can_drop)
        for v in self.catalog.versions.values():
            host, where = self.host.state(v.adapter_id), f"adapter {v.name!r}"
            # NOTE: the runner keeps a host copy while any request holds the adapter, so every
            # upload a plan asks for has its source.
            assert not v.refs or host is HostState.LOADED, f"{where}: held without a host copy"
            assert not v.pinned or v.phase is not Phase.READY or host is HostState.LOADED, where
            waits = host is HostState.LOADING or v.adapter_id in self.host.room_queue
            assert not v.waiters or waits, f"{where}: waiters, but nothing loads"
            unloaded = v.phase is Phase.UNLOADING and not v.refs
            assert not unloaded or host is HostState.LOADING, f"{where}: drained, not removed"

    # ------------------------------------------------------------------ admin operations

    def begin_load(self, op_id: OpId, name: str, path: str, pinned: bool) -> list[Effect]:
        problem = adapter_name_problem(name)
        if problem is not None:
            self._op_done(op_id, problem)
        elif name in self.catalog.by_name:
            self._op_done(op_id, f"adapter {name!r} is already loaded; unload it first")
        elif pinned and self.catalog.num_pinned() >= self.max_pinned:
            self._op_done(
                op_id,
                f"cannot pin adapter {name!r}: at most {self._pin_limit} - 1 = {self.max_pinned} "
                "adapters may be pinned (so unpinned requests never starve)",
            )
        else:
            version = self.catalog.add(name, path, pinned=pinned, op_id=op_id)
            self.host.start_load(version.adapter_id, is_reload=False)
            self._out.append(StartHostLoad(version.adapter_id, path))
        return self._flush()

    def finish_load(self, adapter_id: AdapterId, copy: HostCopy) -> list[Effect]:
        version = self.catalog.versions[adapter_id]
        if version.num_loads and copy.rank != version.rank:
            return self.fail_load(
                adapter_id, f"its rank changed on disk ({version.rank} -> {copy.rank}); load it "
                "again under a new version",
            )  # fmt: skip
        version.rank, version.scaling, version.last_load_s = copy.rank, copy.scaling, copy.load_s
        is_first = version.num_loads == 0
        version.num_loads += 1
        has_room = not is_first or version.phase is Phase.UNLOADING or self._make_room()
        if version.phase is Phase.UNLOADING:  # unloaded while its reload was in flight
            self._remove(version)
        elif has_room:
            self.host.loaded(adapter_id)
            self._out.append(HostCopyReady(adapter_id=adapter_id, weights=copy.weights,
                                           rank=copy.rank, scaling=copy.scaling))  # fmt: skip
            if is_first:
                self._ready(version)
            for request_id in version.waiters:
                self.catalog.let_go(request_id)
                self._grant(version, request_id)
            version.waiters.clear()
        elif version.pinned:  # a pinned adapter must stay in host memory: refuse it (gone: 404)
            self._fail_first_load(version, f"no host memory left for pinned adapter "
                                  f"{version.name!r}; raise --max-loaded-loras")  # fmt: skip
        else:  # registered, but the host cap had no victim: it reloads on first use
            logger.info("adapter %r (id %d) loaded, then dropped by the host cap",
                        version.name, adapter_id)  # fmt: skip
            self.host.drop(adapter_id)
            self._ready(version)
            if version.waiters:
                self.host.room_queue.append(adapter_id)
        self._serve_room_queue()
        return self._flush()

    def fail_load(self, adapter_id: AdapterId, error: str) -> list[Effect]:
        version = self.catalog.versions[adapter_id]
        detail = f"failed to load adapter {version.name!r} from {version.path!r}: {error}"
        # NOTE: a request is not at fault for its adapter's load: never a 400 for it
        if version.phase is Phase.LOADING:  # a failed first load leaves no trace (404)
            self._fail_first_load(version, detail)
        else:  # a failed reload: still registered; the next acquire retries (503)
            self.host.drop(adapter_id)
            self._fail_waiters(version, "adapter_unavailable", detail)
            self._unload_if_drained(version)
        self._serve_room_queue()
        return self._flush()

    def unload(self, op_id: OpId, name: str) -> list[Effect]:
        version = self.catalog.by_name.get(name)
        if version is None:
            self._op_done(op_id, f"adapter {name!r} is not loaded")
        elif version.phase is Phase.LOADING:
            self._op_done(op_id, f"adapter {name!r} is still loading; unload it once loaded")
        else:
            # NOTE: stop new acquires at once; the version, keyed by id, drains on its own.
            self.catalog.stop_new_requests(version)
            del self._loaded[name]
            self._fail_waiters(version, "adapter_not_found", f"adapter {name!r} was unloaded")
            self._unload_if_drained(version)
            self._op_done(op_id)
            self._serve_room_queue()
        return self._flush()

    # ------------------------------------------------------------------ requests

    def acquire(self, request_id: RequestId, name: str) -> list[Effect]:
        assert request_id not in self.catalog.holders, f"request {request_id!r} acquired twice"
        version = self.catalog.by_name.get(name)
        if version is None:
            self._out.append(_not_found(request_id, name))
        elif self.host.state(version.adapter_id) is HostState.LOADED:
            self._grant(version, request_id)
        else:  # first load or reload in flight, or dropped by the host cap: wait for it
            self.catalog.wait(version, request_id)
            absent = self.host.state(version.adapter_id) is None
            if absent and version.adapter_id not in self.host.room_queue:
                self.host.room_queue.append(version.adapter_id)
                self._serve_room_queue()
        return self._flush()

    def release(self, request_id: RequestId, adapter_id: AdapterId) -> list[Effect]:
        version = self.catalog.versions.get(adapter_id)
        assert version is not None, f"release of {request_id!r}: unknown adapter id {adapter_id}"
        assert request_id in version.refs, f"{request_id!r} released twice, or never acquired"
        version.refs.remove(request_id)
        self.catalog.let_go(request_id)
        self.host.touch(adapter_id)
        self._unload_if_drained(version)
        self._serve_room_queue()
        return self._flush()

    # ------------------------------------------------------------------ rules

    def _ready(self, version: AdapterVersion) -> None:
        version.move_to(Phase.READY)
        self._loaded[version.name] = version.path
        op_id, version.op_id = version.op_id, None
        self._op_done(op_id)

    def _grant(self, version: AdapterVersion, request_id: RequestId) -> None:
        self.catalog.hold(version, request_id)
        self.host.touch(version.adapter_id)
        self._out.append(AdapterAcquired(request_id=request_id, adapter_id=version.adapter_id,
                                         rank=version.rank, pinned=version.pinned))  # fmt: skip

    def _fail_waiters(self, version: AdapterVersion, code: str, detail: str) -> None:
        for request_id in version.waiters:
            self.catalog.let_go(request_id)
            self._out.append(AdapterAcquireFailed(request_id=request_id, code=code, detail=detail))
        version.waiters.clear()

    def _fail_first_load(self, version: AdapterVersion, detail: str) -> None:
        self._fail_waiters(version, "adapter_not_found", detail)  # it is gone
        op_id = version.op_id
        self._remove(version)
        self._op_done(op_id, detail)

    def _can_drop(self, adapter_id: AdapterId) -> bool:
        """A host copy may go when nothing holds the version and it is not pinned."""
        version = self.catalog.versions[adapter_id]
        return not (version.pinned or version.refs)

    def _make_room(self) -> bool:
        """Room for one more host copy under --max-loaded-loras; False if no copy may go."""
        if self.host.has_room():
            return True
        victim = self.host.victim(self._can_drop)
        if victim is None:
            return False
        version = self.catalog.versions[victim]
        logger.info("host cap: dropping adapter %r (id %d) from host", version.name, victim)
        self.host.drop(victim)
        version.num_host_drops += 1
        self._out.append(HostCopyDropped(adapter_id=victim))
        return True

    def _serve_room_queue(self) -> None:
        """Start reloads for waiting acquires, oldest first, while the host cap has room."""
        queue = self.host.room_queue
        while queue:
            version = self.catalog.versions.get(queue[0])
            if version is not None and version.waiters and self.host.state(queue[0]) is None:
                if not self._make_room():
                    return
                self.host.start_load(version.adapter_id, is_reload=True)
                self._out.append(StartHostLoad(version.adapter_id, version.path))
            queue.pop(0)

    def _unload_if_drained(self, version: AdapterVersion) -> None:
        loading = self.host.state(version.adapter_id) is HostState.LOADING
        if version.phase is Phase.UNLOADING and not version.refs and not loading:
            self._remove(version)
            logger.info("adapter %r (id %d) unloaded", version.name, version.adapter_id)

    def _remove(self, version: AdapterVersion) -> None:
        """Gone for good: host copy dropped, GPU rows retired (if it ever served)."""
        adapter_id = version.adapter_id
        if self.host.state(adapter_id) is HostState.LOADED:
            self._out.append(HostCopyDropped(adapter_id=adapter_id))
        if self.host.state(adapter_id) is not None:
            self.host.drop(adapter_id)
        if adapter_id in self.host.room_queue:
            self.host.room_queue.remove(adapter_id)
        self.catalog.remove(version)
        if version.num_loads:  # the scheduler may have given it rows
            self._out.append(AdapterRetired(adapter_id=adapter_id))

    def _op_done(self, op_id: OpId | None, error: str | None = None) -> None:
        if op_id is not None:
            self._out.append(AdapterOpDone(op_id=op_id, success=error is None,
                                           error_message=error or "",
                                           loaded_adapters=self.loaded_adapters()))  # fmt: skip

    def _flush(self) -> list[Effect]:
        out, self._out = self._out, []
        return out


def _not_found(request_id: RequestId, name: str) -> AdapterAcquireFailed:
    detail = f"adapter {name!r} is not loaded"
    return AdapterAcquireFailed(request_id=request_id, code="adapter_not_found", detail=detail)
