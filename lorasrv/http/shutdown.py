"""Graceful shutdown. The first SIGINT/SIGTERM stops new connections and requests (503) and lets
the requests in flight finish for up to `--graceful-shutdown-timeout` seconds; then, or at a
second signal, each one still running ends with an error (a stream: an error event, then `[DONE]`)
before the server closes. No stream is ever cut mid-way without its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Final

from aiohttp import web

from lorasrv.engine.engine import Engine

log = logging.getLogger(__name__)

SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
#: after the requests are ended: how long handlers get to write their last event
FINISH_WRITING_S: Final = 5.0
_POLL_S: Final = 0.05


async def shut_down(runner: web.AppRunner, engine: Engine, timeout_s: float) -> None:
    """Drain, end what is left, close the server (and, through the app, stop the engine)."""
    force = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in SIGNALS:  # NOTE: kept until the end, so a second signal cannot kill streams
        loop.add_signal_handler(signum, force.set)
    try:
        for site in list(runner.sites):
            await site.stop()  # no new connections; open ones get 503s from the engine
        if engine.failure is None:
            await _drain(engine, timeout_s, force)
    finally:
        await runner.cleanup()
        for signum in SIGNALS:
            loop.remove_signal_handler(signum)


async def _drain(engine: Engine, timeout_s: float, force: asyncio.Event) -> None:
    engine.drain("the server is shutting down")
    waiting = len(engine.request_ids())
    if waiting:
        log.info("shutting down: waiting up to %g s for %d requests", timeout_s, waiting)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while engine.request_ids() and not force.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_POLL_S):
                        await force.wait()
    left = len(engine.request_ids())
    if left:
        why = "a second signal" if force.is_set() else f"--graceful-shutdown-timeout {timeout_s:g}"
        log.warning("shutting down: ending %d requests still in flight (%s)", left, why)
        engine.end_requests(f"the server is shutting down ({why})")
