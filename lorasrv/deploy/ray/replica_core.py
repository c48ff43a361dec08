"""One replica's work, without Ray: an Engine, its adapter sync, and groups of submissions run
through it with their output deltas streamed back (tagged by index, coalesced as they queue up).

`replica.py` wraps this in a Ray Serve deployment; tests drive it in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from lorasrv.config import LoraRef, ServerConfig
from lorasrv.deploy.ray.adapter_sync import AdapterSync
from lorasrv.deploy.ray.protocol import ReplicaInfo, ReplicaReport, Tagged, error_output
from lorasrv.engine.engine import Engine
from lorasrv.engine.request_handle import RequestHandle
from lorasrv.engine.requests import Submission
from lorasrv.errors import LorasrvError
from lorasrv.messages import AdapterStatus, RequestOutput
from lorasrv.metrics import EngineSnapshot

log = logging.getLogger(__name__)

#: builds the replica's engine from its config (tests and benchmarks inject parts through it)
EngineFactory = Callable[[ServerConfig], Engine]
Claim = Callable[[str], Awaitable[object]]


class ReplicaCore:
    def __init__(
        self,
        config: ServerConfig,
        registry: Any,
        *,
        replica_id: str | None = None,
        make_engine: EngineFactory = Engine,
    ) -> None:
        self.replica_id = replica_id or uuid.uuid4().hex[:8]
        self.engine = make_engine(config)
        self.sync = AdapterSync(self.engine, registry, self._report)

    async def start(self) -> None:
        await self.engine.start()
        try:  # the adapters the engine started with (`--lora-paths`, the demo's)
            held = await self.engine.describe_adapters()
            initial = tuple(
                LoraRef(lora_name=s.name, lora_path=s.path, pinned=s.pinned) for s in held
            )
            await self.sync.start(initial)
        except BaseException:
            await self.engine.stop()
            raise
        log.info("replica %s ready (pid %d)", self.replica_id, os.getpid())

    async def stop(self) -> None:
        await self.sync.stop()
        await self.engine.stop()

    def check_health(self) -> None:
        if not self.engine.is_healthy():
            raise RuntimeError(self.engine.failure or "the engine is not running")

    # ------------------------------------------------------------------ requests

    async def claim(self, lora_name: str) -> None:
        """The adapter is in this engine at its registered version (Ray: the multiplexed load)."""
        await self.sync.ensure(lora_name)

    async def stream(
        self, subs: list[Submission], claim: Claim | None = None
    ) -> AsyncIterator[list[Tagged]]:
        """Run a group (one adapter); yield its deltas as they come, every submission ending with
        a finished one (an error included). Closing early aborts whatever still runs. `claim`
        loads the group's adapter (Ray's multiplexed load; `self.claim` by default)."""
        lora_name = subs[0].lora_name if subs else None
        if lora_name is not None:
            try:
                await (claim or self.claim)(lora_name)
            except LorasrvError as exc:
                yield [(i, error_output(s.request_id or "", exc)) for i, s in enumerate(subs)]
                return
        queue: asyncio.Queue[Tagged] = asyncio.Queue()
        handles, pumps = self._start_group(subs, queue)
        remaining = len(subs)
        try:
            while remaining:
                chunk = [await queue.get()]
                while not queue.empty():
                    chunk.append(queue.get_nowait())
                remaining -= sum(out.finished for _, out in chunk)
                yield chunk
        finally:
            for handle in handles:
                handle.abort()
            for pump in pumps:
                pump.cancel()

    async def collect(
        self, subs: list[Submission], claim: Claim | None = None
    ) -> list[list[RequestOutput]]:
        """Run a group to the end; every submission's deltas, in order."""
        outputs: list[list[RequestOutput]] = [[] for _ in subs]
        async for chunk in self.stream(subs, claim):
            for index, out in chunk:
                outputs[index].append(out)
        return outputs

    def _start_group(
        self, subs: list[Submission], queue: asyncio.Queue[Tagged]
    ) -> tuple[list[RequestHandle], list[asyncio.Task[None]]]:
        handles: list[RequestHandle] = []
        pumps: list[asyncio.Task[None]] = []
        for index, sub in enumerate(subs):
            try:
                handle = self.engine.submit(sub)
            except LorasrvError as exc:
                queue.put_nowait((index, error_output(sub.request_id or "", exc)))
                continue
            handles.append(handle)
            pumps.append(asyncio.create_task(_pump(index, handle, queue)))
        return handles, pumps

    # ------------------------------------------------------------------ facts

    def info(self) -> ReplicaInfo:
        engine = self.engine
        ready = engine.ready_info
        return ReplicaInfo(
            config=engine.config,
            model_path=engine.model_path,
            ready=ready,
            tokenizer=engine.tokenizer,
        )

    async def warm(self, lora_name: str, claim: Claim | None = None) -> tuple[str, str] | None:
        """Load (claim) the adapter now; None, or the refusal as (error code, detail)."""
        try:
            await (claim or self.claim)(lora_name)
        except LorasrvError as exc:
            return exc.code, exc.detail
        return None

    async def _report(self, applied: int, errors: dict[str, str]) -> ReplicaReport:
        engine = self.engine
        adapters: tuple[AdapterStatus, ...] = ()
        healthy = engine.is_healthy()
        if healthy:
            with contextlib.suppress(LorasrvError):
                adapters = await engine.describe_adapters()
        stats = engine.last_stats
        snapshot = EngineSnapshot(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting + stats.num_acquiring,
            num_kv_pages=stats.num_kv_pages,
            num_kv_pages_used=stats.num_kv_pages_used,
            is_healthy=healthy,
            adapters=adapters,
        )
        return ReplicaReport(
            replica_id=self.replica_id,
            pid=os.getpid(),
            healthy=healthy,
            applied=applied,
            errors=errors,
            stats={key: float(value) for key, value in stats._asdict().items()},
            adapters=adapters,
            metrics=engine.metrics.render(snapshot),
        )


async def _pump(index: int, handle: RequestHandle, queue: asyncio.Queue[Tagged]) -> None:
    try:
        async for out in handle:
            queue.put_nowait((index, out))
    except LorasrvError as exc:  # the handle raises a failed request's error: send it on
        queue.put_nowait((index, error_output(handle.request_id, exc)))
