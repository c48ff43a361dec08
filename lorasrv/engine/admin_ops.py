"""The engine's admin operations: adapter loads, unloads and describes (answered by the adapter
manager) and cache flushes (answered by the scheduler), each a future by op id, and the checks a
load or unload passes before it is sent (adapter_admin). Engine delegates to it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from lorasrv.engine import adapter_admin as admin
from lorasrv.engine.actor import Sender
from lorasrv.engine.adapter_status import with_gpu
from lorasrv.engine.stats import SchedulerStats
from lorasrv.errors import AdapterError, BadRequest, LorasrvError
from lorasrv.ids import OpId
from lorasrv.messages import (
    AdapterInbox,
    AdapterOpDone,
    AdapterStatus,
    CacheFlushed,
    DescribeAdapters,
    FlushCache,
    LoadAdapter,
    RunnerReady,
    SchedulerInbox,
    UnloadAdapter,
)


class AdminOps:
    """OpSink and CacheSink for the actors; `check_running` raises while the engine refuses
    work, `stats` is the scheduler's latest snapshot (adapters' GPU rows)."""

    def __init__(
        self,
        *,
        check_running: Callable[[], None],
        stats: Callable[[], SchedulerStats],
    ) -> None:
        self._check_running = check_running
        self._stats = stats
        self._ops: dict[OpId, asyncio.Future[AdapterOpDone]] = {}
        self._flushes: dict[OpId, asyncio.Future[int]] = {}
        self._op_ids = itertools.count(1)
        # set by the engine's start (the demo model fills in the config there)
        self.lora_enabled = False
        self.adapters: Sender[AdapterInbox] | None = None
        self.scheduler: Sender[SchedulerInbox] | None = None
        self.read_adapter_config: Callable[[str], Any] | None = None
        self.ready: RunnerReady | None = None

    def fail_all(self, error: LorasrvError) -> None:
        futures: list[asyncio.Future[Any]] = [*self._ops.values(), *self._flushes.values()]
        for future in futures:
            if not future.done():
                future.set_exception(error)

    # OpSink / CacheSink, called by actors on the event loop.
    def op_done(self, result: AdapterOpDone) -> None:
        future = self._ops.pop(result.op_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def cache_flushed(self, result: CacheFlushed) -> None:
        future = self._flushes.pop(result.op_id, None)
        if future is not None and not future.done():
            future.set_result(result.num_pages)

    async def flush_cache(self) -> int:
        self._check_running()
        assert self.scheduler is not None
        op_id = OpId(next(self._op_ids))
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._flushes[op_id] = future
        self.scheduler.send(FlushCache(op_id=op_id))
        return await future

    def _send_op(self, make: Callable[[OpId], AdapterInbox]) -> asyncio.Future[AdapterOpDone]:
        self._check_running()
        assert self.adapters is not None
        op_id = OpId(next(self._op_ids))
        future: asyncio.Future[AdapterOpDone] = asyncio.get_running_loop().create_future()
        self._ops[op_id] = future
        self.adapters.send(make(op_id))
        return future

    async def load(
        self, lora_name: str, lora_path: str, pinned: bool, *, replace: bool
    ) -> AdapterOpDone:
        if not self.lora_enabled:
            raise BadRequest("LoRA is not enabled on this server (start it with --enable-lora)")
        admin.check_load_names(lora_name, lora_path)
        live = admin.live_adapters(await self.describe((lora_name,)))
        if not replace:
            admin.check_not_loaded(lora_name, live)
        assert self.read_adapter_config is not None, "load before the engine started"
        assert self.ready is not None, "load before the engine started"
        await admin.check_folder(self.read_adapter_config, self.ready, lora_path)
        unloaded = None
        if lora_name in live:  # NOTE: both sent in one go, so no acquire falls between them
            unloaded = self._send_op(lambda op: UnloadAdapter(op_id=op, lora_name=lora_name))
        loaded = self._send_op(
            lambda op: LoadAdapter(
                op_id=op, lora_name=lora_name, lora_path=lora_path, pinned=pinned
            )
        )
        if unloaded is not None and not (await unloaded).success:
            loaded.cancel()
            raise AdapterError((await unloaded).error_message)
        return _succeeded(await loaded)

    async def unload(self, lora_name: str) -> AdapterOpDone:
        admin.check_loaded(lora_name, admin.live_adapters(await self.describe((lora_name,))))
        return _succeeded(
            await self._send_op(lambda op: UnloadAdapter(op_id=op, lora_name=lora_name))
        )

    async def describe(self, names: tuple[str, ...] | None) -> tuple[AdapterStatus, ...]:
        if self.adapters is None:
            return ()
        done = await self._send_op(lambda op: DescribeAdapters(op_id=op, names=names))
        ids = {a.adapter_id for a in done.adapters}
        gpu = {g.adapter_id: g for g in self._stats().gpu_adapters if g.adapter_id in ids}
        return tuple(with_gpu(a, gpu[a.adapter_id]) if a.adapter_id in gpu else a
                     for a in done.adapters)  # fmt: skip


def _succeeded(done: AdapterOpDone) -> AdapterOpDone:
    if not done.success:
        raise AdapterError(done.error_message)
    return done
