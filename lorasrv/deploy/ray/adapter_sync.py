"""A replica's side of the adapter registry: loads an adapter into its engine on first use, carries
out registrations and unregistrations, and sends the heartbeat. Owns which registry generation of
each adapter the engine holds; the engine owns everything else about adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from lorasrv.config import LoraRef
from lorasrv.deploy.ray.protocol import AdapterEntry, ReplicaReport, Snapshot
from lorasrv.engine.engine import Engine
from lorasrv.errors import AdapterNotFound, LorasrvError
from lorasrv.metrics import DRAINING_STATE

log = logging.getLogger(__name__)

HEARTBEAT_S: Final = 1.0


class AdapterSync:
    """`registry` is the registry actor's handle (calls go through `.remote`)."""

    def __init__(
        self,
        engine: Engine,
        registry: Any,
        make_report: Callable[[int, dict[str, str]], Awaitable[ReplicaReport]],
    ) -> None:
        self._engine = engine
        self._registry = registry
        self._make_report = make_report
        self._entries: dict[str, AdapterEntry] = {}
        self._loaded: dict[str, int] = {}  # adapter -> registry generation in the engine
        self._locks: dict[str, asyncio.Lock] = {}
        self._applied = -1
        self._errors: dict[str, str] = {}
        self._latest: Snapshot | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, initial: tuple[LoraRef, ...]) -> None:
        """Seed the registry with the engine's `--lora-paths` (first replica only), adopt the
        ones still registered, apply the rest, then beat."""
        snapshot: Snapshot = await self._registry.seed.remote(initial)
        for ref in initial:
            entry = snapshot.entries.get(ref.lora_name)
            if entry is not None and entry.path == ref.lora_path:
                self._loaded[ref.lora_name] = entry.generation
        await self._apply(snapshot)
        await self._beat()
        self._tasks = [
            asyncio.create_task(self._watch(), name="lorasrv-registry-watch"),
            asyncio.create_task(self._apply_latest(), name="lorasrv-registry-apply"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ requests

    async def ensure(self, name: str) -> None:
        """The engine holds the registered version of `name` (loading it now if not). An unknown
        name is left to the engine, which answers 404 as the single server does."""
        entry = self._entries.get(name) or await self._registry.lookup.remote(name)
        if entry is None or self._loaded.get(name) == entry.generation:
            return
        async with self._lock(name):
            if self._loaded.get(name) == entry.generation:
                return
            # replace: an older version held here keeps serving if the new one is refused
            await self._engine.load_adapter(name, entry.path, entry.pinned, replace=True)
            self._loaded[name] = entry.generation
            log.info("adapter %s (generation %d) loaded on first use", name, entry.generation)
        with contextlib.suppress(Exception):  # the watch loop beats again within a second
            await self._beat()  # so the next admin answer counts this load

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _unload(self, name: str) -> str | None:
        self._loaded.pop(name, None)
        try:
            await self._engine.unload_adapter(name)
        except AdapterNotFound:
            return None  # gone already
        except LorasrvError as exc:
            return exc.detail
        return None

    # ------------------------------------------------------------------ registry changes

    async def _watch(self) -> None:
        """Long-poll the registry; beat after every answer (at least once a second)."""
        seen = self._applied
        while True:
            try:
                snapshot: Snapshot = await self._registry.watch.remote(seen, HEARTBEAT_S)
                if snapshot.version != seen:
                    seen = snapshot.version
                    self._latest = snapshot
                    self._wake.set()
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # the registry restarting, a transient Ray error: keep trying
                log.exception("adapter registry unreachable; retrying")
                await asyncio.sleep(HEARTBEAT_S)

    async def _apply_latest(self) -> None:
        """One change at a time, in its own task, so draining an unload never stops the beat."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._latest is not None and self._latest.version != self._applied:
                await self._apply(self._latest)
                with contextlib.suppress(Exception):  # the watch loop beats again soon
                    await self._beat()  # answer the admin call waiting for this version now

    async def _beat(self) -> None:
        report = await self._make_report(self._applied, dict(self._errors))
        await self._registry.report.remote(report)

    async def _apply(self, snapshot: Snapshot) -> None:
        self._entries = dict(snapshot.entries)
        errors: dict[str, str] = {}
        try:
            held = await self._engine.describe_adapters()
        except LorasrvError as exc:
            log.error("cannot apply registry version %d: %s", snapshot.version, exc.detail)
            return
        for status in held:
            if status.state == DRAINING_STATE:
                continue
            entry = snapshot.entries.get(status.name)
            async with self._lock(status.name):  # NOTE: after a first-use load in flight
                if entry is None or self._loaded.get(status.name) != entry.generation:
                    problem = await self._unload(status.name)
                    if problem is not None:
                        errors[status.name] = problem
        for entry in snapshot.entries.values():
            if entry.pinned:  # pinned adapters live on every replica, loaded now
                try:
                    await self.ensure(entry.name)
                except LorasrvError as exc:
                    errors[entry.name] = exc.detail
        self._errors = errors
        self._applied = snapshot.version
        log.info("registry version %d applied (%d adapters)", snapshot.version, len(self._entries))
