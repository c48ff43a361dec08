"""`serve_async`: starts the engine, serves, and stops it on SIGTERM or when the engine dies."""

from __future__ import annotations

import asyncio
import os
import signal

from lorasrv.config import build_config
from lorasrv.http.app import serve_async
from tests.http.fake_engine import FakeEngine


async def wait_until_serving(engine: FakeEngine, task: asyncio.Task[int]) -> None:
    # NOTE: SIGTERM before serve_async installs its handler would kill the test process.
    async with asyncio.timeout(5):
        while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or not engine.is_started:
            assert not task.done(), task
            await asyncio.sleep(0.01)


async def test_sigterm_stops_cleanly() -> None:
    engine = FakeEngine(build_config({"port": 0, "host": "127.0.0.1"}))
    task = asyncio.create_task(serve_async(engine.config, engine))
    await wait_until_serving(engine, task)
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(5):
        assert await task == 0
    assert engine.is_stopped
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_dead_engine_ends_the_server_with_status_1() -> None:
    engine = FakeEngine(build_config({"port": 0, "host": "127.0.0.1"}))
    task = asyncio.create_task(serve_async(engine.config, engine))
    await wait_until_serving(engine, task)
    engine.healthy = False
    async with asyncio.timeout(5):
        assert await task == 1
    assert engine.is_stopped
