"""`serve_async` over the real engine: starts it, serves, and stops it on SIGTERM or when the engine
dies (a crashed actor)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import pytest

from lorasrv.engine.requests import Submission
from lorasrv.errors import EngineDead
from lorasrv.http.app import serve_async
from tests.fakes import FakeRunner
from tests.http.real_server import fake_engine, server_config, wait_until


async def wait_until_serving(task: asyncio.Task[int], is_up: Callable[[], bool]) -> None:
    # NOTE: SIGTERM before serve_async installs its handler would kill the test process.
    async with asyncio.timeout(5):
        while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or not is_up():
            assert not task.done(), task
            await asyncio.sleep(0.005)


async def test_sigterm_stops_cleanly() -> None:
    config = server_config(port=0, host="127.0.0.1")
    engine = fake_engine(config)
    task = asyncio.create_task(serve_async(config, engine))
    await wait_until_serving(task, engine.is_healthy)
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(5):
        assert await task == 0
    assert engine.failure == "engine stopped"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_dead_engine_ends_the_server_with_status_1() -> None:
    config = server_config(port=0, host="127.0.0.1")
    runner = FakeRunner(num_slots=2)
    engine = fake_engine(config, runner)
    task = asyncio.create_task(serve_async(config, engine))
    await wait_until_serving(task, engine.is_healthy)
    runner.fail_at_step = 1
    with pytest.raises(EngineDead, match="fake GPU failure"):
        await engine.submit(Submission(text="boom")).result()
    await wait_until(task.done, "serve_async returned", timeout_s=10)
    assert task.result() == 1
    assert engine.failure is not None
