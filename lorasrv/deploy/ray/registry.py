"""The deployment's adapter registry: name -> path, pinned flag and generation, read by every
replica, plus the replicas' heartbeats. It runs as one Ray actor; it never calls a replica.

Replicas pull: each watches the registry (a long poll), carries out loads and unloads in its own
engine, and reports which version it has applied. An admin answer waits for every live replica.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from lorasrv.config import LoraRef
from lorasrv.deploy.ray.protocol import AdapterEntry, ReplicaReport, Snapshot

#: a replica whose last heartbeat is older than this is taken for dead (it beats every second)
REPLICA_TTL_S: Final = 5.0
#: how long an admin answer waits for the replicas to apply it (an unload drains running requests)
APPLY_TIMEOUT_S: Final = 300.0


class RegistryState:
    """The registry's data and rules, with no waiting. Every change bumps `version`."""

    def __init__(self) -> None:
        self.entries: dict[str, AdapterEntry] = {}
        self.version = 0
        self.seeded = False
        self._generation = 0
        self._reports: dict[str, tuple[ReplicaReport, float]] = {}

    def snapshot(self) -> Snapshot:
        return Snapshot(version=self.version, entries=dict(self.entries))

    def register(
        self, name: str, path: str, pinned: bool, replace: bool = False
    ) -> tuple[str | None, AdapterEntry | None]:
        """(None, the entry it replaces) or (why not, None); words as the engine's admin."""
        previous = self.entries.get(name)
        if previous is not None and not replace:
            return f"adapter {name!r} has already been loaded; unload it first, or replace it " \
                "in place", None  # fmt: skip
        self._generation += 1
        self.entries[name] = AdapterEntry(
            name=name, path=path, pinned=pinned, generation=self._generation
        )
        self.version += 1
        return None, previous

    def restore(self, name: str, previous: AdapterEntry | None) -> None:
        """Undo a registration: the entry it replaced (same generation), or none."""
        if previous is None:
            self.entries.pop(name, None)
        else:
            self.entries[name] = previous
        self.version += 1

    def unregister(self, name: str) -> str | None:
        if self.entries.pop(name, None) is None:
            return f"adapter {name!r} cannot be found: it is not loaded"
        self.version += 1
        return None

    def seed(self, refs: tuple[LoraRef, ...]) -> None:
        """The adapters the engines start with (`--lora-paths`), once per deployment: a replica
        that restarts later must not bring back an adapter unloaded meanwhile."""
        if self.seeded:
            return
        self.seeded = True
        for ref in refs:
            if ref.lora_name not in self.entries:
                self.register(ref.lora_name, ref.lora_path, ref.pinned)

    def report(self, report: ReplicaReport, now: float) -> None:
        self._reports[report.replica_id] = (report, now)

    def alive(self, now: float) -> list[ReplicaReport]:
        return [r for r, seen in self._reports.values() if now - seen <= REPLICA_TTL_S]

    def forget_dead(self, now: float) -> None:
        dead = [rid for rid, (_, seen) in self._reports.items() if now - seen > REPLICA_TTL_S]
        for rid in dead:
            del self._reports[rid]

    def behind(self, version: int, now: float) -> list[str]:
        """Live replicas that have not yet applied `version`."""
        return [r.replica_id for r in self.alive(now) if r.applied < version]

    def failures(self, version: int, names: frozenset[str], now: float) -> list[str]:
        """What live replicas that applied `version` could not do for `names`."""
        return [
            f"replica {r.replica_id}: {r.errors[name]}"
            for r in self.alive(now)
            if r.applied >= version
            for name in sorted(names)
            if name in r.errors
        ]


class AdapterRegistry:
    """The actor (`ray.remote(AdapterRegistry)`): RegistryState behind async methods that wait."""

    def __init__(self) -> None:
        self._state = RegistryState()
        self._changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def register(
        self, name: str, path: str, pinned: bool, replace: bool = False
    ) -> tuple[str | None, int, AdapterEntry | None]:
        """(why not, or None; the version that holds the change; the entry it replaced)."""
        problem, previous = self._state.register(name, path, pinned, replace)
        await self._notify()
        return problem, self._state.version, previous

    async def restore(self, name: str, previous: AdapterEntry | None) -> int:
        self._state.restore(name, previous)
        await self._notify()
        return self._state.version

    async def unregister(self, name: str) -> tuple[str | None, int]:
        problem = self._state.unregister(name)
        await self._notify()
        return problem, self._state.version

    async def seed(self, refs: tuple[LoraRef, ...]) -> Snapshot:
        self._state.seed(refs)
        await self._notify()
        return self._state.snapshot()

    async def snapshot(self) -> Snapshot:
        return self._state.snapshot()

    async def lookup(self, name: str) -> AdapterEntry | None:
        return self._state.entries.get(name)

    async def watch(self, after: int, timeout_s: float) -> Snapshot:
        """The snapshot once its version differs from `after`, or after `timeout_s` anyway."""
        async with self._changed:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait_for(lambda: self._state.version != after)
            except TimeoutError:
                pass
        return self._state.snapshot()

    async def report(self, report: ReplicaReport) -> None:
        self._state.report(report, time.monotonic())
        await self._notify()

    async def replicas(self) -> list[ReplicaReport]:
        now = time.monotonic()
        self._state.forget_dead(now)
        return self._state.alive(now)

    async def wait_applied(
        self, version: int, names: frozenset[str], timeout_s: float = APPLY_TIMEOUT_S
    ) -> list[str]:
        """Wait until every live replica has applied `version`; what failed there for `names`.
        A replica that dies meanwhile stops counting once its heartbeat is stale."""
        deadline = time.monotonic() + timeout_s
        while behind := self._state.behind(version, time.monotonic()):
            left = deadline - time.monotonic()
            if left <= 0:
                return [f"replica {rid} did not apply the change within {timeout_s:g} s"
                        for rid in behind]  # fmt: skip
            async with self._changed:
                try:  # NOTE: wake up now and then, so a dead replica ages out
                    async with asyncio.timeout(min(left, REPLICA_TTL_S / 5)):
                        await self._changed.wait()
                except TimeoutError:
                    pass
        return self._state.failures(version, names, time.monotonic())
