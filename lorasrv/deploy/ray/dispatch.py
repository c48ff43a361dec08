"""Ingress side: submissions made in one event-loop turn are grouped by adapter (one replica call
per group, routed by that adapter), and the deltas that come back go to each request's queue.

A replica that dies loses no request that had not started on it: those are sent again (a
non-streamed group, whose client has seen nothing, is sent again whole). Requests that had
started there end with a 503. Ray-free: the replica calls are injected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

from lorasrv.deploy.ray.protocol import REPLICA_GONE, Tagged, error_output
from lorasrv.engine.requests import Submission
from lorasrv.errors import EngineDead, LorasrvError, Overloaded
from lorasrv.ids import RequestId
from lorasrv.messages import RequestOutput

log = logging.getLogger(__name__)

#: (adapter or None, submissions, streamed?) -> the group's tagged deltas, chunk by chunk
ReplicaCall = Callable[[str | None, list[Submission], bool], AsyncIterator[list[Tagged]]]
MAX_ATTEMPTS: Final = 4
RETRY_DELAY_S: Final = 0.2


class _Pending:
    __slots__ = ("aborted", "finished", "group", "queue", "rid", "started", "sub", "task")

    def __init__(self, sub: Submission, queue: asyncio.Queue[RequestOutput]) -> None:
        assert sub.request_id is not None, "the ingress names every request it dispatches"
        self.rid: str = sub.request_id
        self.sub = sub
        self.queue = queue
        self.started = False  # a delta reached the client's queue
        self.finished = False
        self.aborted = False
        self.group: list[_Pending] = []
        self.task: asyncio.Task[None] | None = None  # None while the group is forming

    def put(self, out: RequestOutput) -> None:
        if not self.finished:
            self.started = True
            self.finished = out.finished
            self.queue.put_nowait(out)

    def fail(self, error: LorasrvError) -> None:
        self.put(error_output(self.rid, error))


class Dispatcher:
    def __init__(
        self,
        call: ReplicaCall,
        *,
        is_replica_gone: Callable[[BaseException], bool],
        is_overloaded: Callable[[BaseException], bool] = lambda _: False,
        on_resend: Callable[[int], None] = lambda _: None,
    ) -> None:
        self._call = call
        self._on_resend = on_resend
        self._is_gone = is_replica_gone
        self._is_overloaded = is_overloaded
        self._forming: dict[tuple[str | None, bool], list[_Pending]] = {}
        self._by_id: dict[str, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, sub: Submission, queue: asyncio.Queue[RequestOutput], stream: bool) -> None:
        """Queue `sub`; it leaves with its adapter's group at the end of this loop turn."""
        if not self._forming:
            asyncio.get_running_loop().call_soon(self._flush)
        pending = _Pending(sub, queue)
        self._by_id[pending.rid] = pending
        self._forming.setdefault((sub.lora_name, stream), []).append(pending)

    def in_flight(self, request_id: str) -> bool:
        return request_id in self._by_id

    def request_ids(self) -> tuple[str, ...]:
        return tuple(self._by_id)

    def abort(self, request_id: str) -> None:
        """End the request with an "abort" output, as the engine does; its group's call is
        cancelled once every request of the group is gone."""
        pending = self._by_id.pop(request_id, None)
        if pending is None:
            return
        pending.put(
            RequestOutput(
                request_id=RequestId(request_id), text="", token_ids=(), finished=True,
                finish_reason="abort",
            )
        )  # fmt: skip
        pending.aborted = True
        task = pending.task
        if task is not None and all(p.aborted or p.finished for p in pending.group):
            task.cancel()

    def forget(self, request_id: str) -> None:
        """The request's handle saw its end."""
        self._by_id.pop(request_id, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _flush(self) -> None:
        forming, self._forming = self._forming, {}
        for (lora_name, stream), group in forming.items():
            live = [p for p in group if not p.aborted]
            if not live:
                continue
            task = asyncio.create_task(self._run(lora_name, live, stream))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            for pending in live:
                pending.group, pending.task = live, task

    async def _run(self, lora_name: str | None, group: list[_Pending], stream: bool) -> None:
        todo = group
        try:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    await self._attempt(lora_name, todo, stream)
                    todo = []
                except Exception as exc:
                    todo = self._after_failure(exc, todo, attempt)
                if not todo:
                    break
                await asyncio.sleep(RETRY_DELAY_S * attempt)
        finally:  # cancelled (closing), or a replica that ended a stream early: never hang
            for pending in group:
                if not (pending.finished or pending.aborted):
                    pending.fail(EngineDead(REPLICA_GONE))

    async def _attempt(self, lora_name: str | None, todo: list[_Pending], stream: bool) -> None:
        async for chunk in self._call(lora_name, [p.sub for p in todo], stream):
            for index, out in chunk:
                pending = todo[index]
                if not pending.aborted:
                    pending.put(out)

    def _after_failure(self, exc: Exception, todo: list[_Pending], attempt: int) -> list[_Pending]:
        """The requests to send again after `exc`; the others get their error now."""
        if self._is_gone(exc) and attempt < MAX_ATTEMPTS:
            again = [p for p in todo if not (p.started or p.aborted)]
            log.warning(
                "replica lost (%s); sending %d of %d requests again", type(exc).__name__,
                len(again), len(todo),
            )  # fmt: skip
            self._on_resend(len(again))
        else:
            again = []
        if self._is_overloaded(exc):
            error: LorasrvError = Overloaded(f"every replica is busy: {exc}")
        elif self._is_gone(exc):
            error = EngineDead(REPLICA_GONE)
        else:
            log.error("replica call failed", exc_info=exc)
            error = LorasrvError(f"replica call failed: {type(exc).__name__}: {exc}")
        for pending in todo:
            if pending not in again and not pending.aborted:
                pending.fail(error)
        return again
