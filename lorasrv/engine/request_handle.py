"""RequestHandle: the async iterator over one request's output deltas that Engine.submit returns.
Owns nothing but its queue's reading end; the engine owns the queue and the request's lifetime.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, Self

from lorasrv.engine.results import RequestResult, ResultBuilder
from lorasrv.errors import error_for_code
from lorasrv.ids import RequestId
from lorasrv.messages import RequestOutput
from lorasrv.metrics import RequestTracker


class RequestOwner(Protocol):
    """What a handle asks of the engine: forget a finished request, abort a running one."""

    def forget(self, request_id: RequestId) -> None: ...

    def abort(self, request_id: str) -> None: ...


class RequestHandle:
    """Async iterator over one request's output deltas (`RequestOutput`); raises the request's
    error, if any. `result()` waits for all of it; `abort()` frees the request early."""

    def __init__(
        self,
        owner: RequestOwner,
        request_id: RequestId,
        queue: asyncio.Queue[RequestOutput],
        tracker: RequestTracker,
    ):
        self.request_id = request_id
        self._owner = owner
        self._queue = queue
        self._tracker = tracker  # metrics: TTFT, inter-token latency, tokens, finish reason
        self.finished = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        self._tracker.observe(out)
        if out.finished:
            self.finished = True
            self._owner.forget(self.request_id)
            if out.error_code is not None:
                raise error_for_code(out.error_code, out.error_detail or out.error_code)
        return out

    async def result(self) -> RequestResult:
        """Every output folded into one result; leaving early (error, cancel) aborts."""
        builder = ResultBuilder(self.request_id)
        try:
            async for out in self:
                builder.add(out)
        finally:
            self.abort()  # no-op once finished
        return builder.result()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._tracker.aborted()
            self._owner.abort(self.request_id)
