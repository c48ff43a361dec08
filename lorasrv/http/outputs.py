"""Many engine requests answered together (a /generate batch, SGLang's `n`, OpenAI choices):
submit them all or none, then read their outputs as they come. Speaks no wire format and imports no
aiohttp, so other front ends (a Ray Serve ingress) reuse it.

Whoever calls `submit_all` aborts every handle when done (`abort_all` in `finally`): that is what
frees a vanished client's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterable, Sequence

from lorasrv.engine.engine import Engine
from lorasrv.engine.request_handle import RequestHandle
from lorasrv.engine.requests import Submission
from lorasrv.engine.results import ResultBuilder
from lorasrv.messages import RequestOutput


def submit_all(engine: Engine, submissions: Iterable[Submission]) -> list[RequestHandle]:
    """All submitted, or none: a refusal (bad value, overload) aborts the ones before it; a
    batch that could never fit is refused before any is submitted."""
    submissions = list(submissions)
    engine.check_batch_size(len(submissions))
    handles: list[RequestHandle] = []
    try:
        for submission in submissions:
            handles.append(engine.submit(submission))
    except BaseException:
        abort_all(handles)
        raise
    return handles


def abort_all(handles: Iterable[RequestHandle]) -> None:
    for handle in handles:
        handle.abort()  # no-op for finished ones


async def collect(handles: Sequence[RequestHandle]) -> list[ResultBuilder]:
    """Every request's outputs folded, in handle order; raises the first request error."""
    builders = [ResultBuilder(handle.request_id) for handle in handles]
    async with contextlib.aclosing(merged(handles)) as outputs:
        async for index, out in outputs:
            builders[index].add(out)
    return builders


async def merged(
    handles: Sequence[RequestHandle],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Every handle's outputs as they arrive, tagged with the handle's index; raises the first
    request error. NOTE: at most one `__anext__` per handle is in flight, so order per handle holds.
    """
    pending = {asyncio.ensure_future(_next(handle)): i for i, handle in enumerate(handles)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                out = task.result()
                if out is not None:
                    pending[asyncio.ensure_future(_next(handles[index]))] = index
                    yield index, out
    finally:
        for task in pending:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a second failure is not worth a warning
            task.cancel()
        if pending:
            await asyncio.wait(pending)


async def _next(handle: RequestHandle) -> RequestOutput | None:
    try:
        return await handle.__anext__()
    except StopAsyncIteration:
        return None
