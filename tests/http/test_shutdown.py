"""Graceful shutdown through `serve_async`: at SIGTERM, streams in flight finish; past
--graceful-shutdown-timeout, or at a second SIGTERM, each ends with an error event and [DONE];
nothing new is taken meanwhile."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import aiohttp
import pytest

from lorasrv.engine.requests import Submission
from lorasrv.errors import ShuttingDown
from lorasrv.http.app import serve_async
from lorasrv.http.listen import bind_sockets
from lorasrv.http.state import ENGINE_KEY
from tests.fakes import FakeRunner
from tests.http.conftest import Client
from tests.http.real_server import fake_engine, server_config, wait_until
from tests.http.test_serve import wait_until_serving

LONG = {"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}


async def read_stream(resp: aiohttp.ClientResponse) -> list[Any]:
    """Every SSE payload: JSON objects, and the final "[DONE]"."""
    events: list[Any] = []
    async for line in resp.content:
        text = line.decode().strip()
        if text.startswith("data: "):
            payload = text.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def start(timeout_s: float, step_delay_s: float) -> tuple[asyncio.Task[int], str, Any]:
    config = server_config(graceful_shutdown_timeout=timeout_s)
    runner = FakeRunner(lora_rows=16)
    runner.step_delay_s = step_delay_s
    engine = fake_engine(config, runner)
    sockets = bind_sockets("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    task = asyncio.create_task(serve_async(config, engine, sockets))
    await wait_until_serving(task, engine.is_healthy)
    return task, url, engine


@pytest.mark.parametrize("how", ["timeout", "second_signal"])
async def test_streams_past_the_drain_end_with_an_error_and_done(how: str) -> None:
    timeout_s = 0.3 if how == "timeout" else 30.0
    task, url, engine = await start(timeout_s, step_delay_s=0.1)  # 200 tokens: ~20 s
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{url}/generate", json=LONG)
        assert resp.status == 200
        await resp.content.readline()  # streaming
        started = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        await wait_until(lambda: engine.draining is not None, "draining")
        with pytest.raises(ShuttingDown):
            engine.submit(Submission(text="late"))  # nothing new is taken
        if how == "second_signal":
            await asyncio.sleep(0.3)
            assert not resp.content.at_eof()  # still streaming: 30 s allowed
            os.kill(os.getpid(), signal.SIGTERM)
        events = await read_stream(resp)
    assert events[-1] == "[DONE]"
    assert "shutting down" in events[-2]["error"]["message"]
    assert time.monotonic() - started < 5
    async with asyncio.timeout(10):
        assert await task == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


async def test_streams_in_flight_finish_within_the_timeout() -> None:
    task, url, _ = await start(30.0, step_delay_s=0.002)
    body = {**LONG, "sampling_params": {"max_new_tokens": 100, "ignore_eos": True}}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{url}/generate", json=body)
        await resp.content.readline()
        os.kill(os.getpid(), signal.SIGTERM)
        events = await read_stream(resp)
    assert events[-1] == "[DONE]"
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "length"
    assert events[-2]["meta_info"]["completion_tokens"] == 100
    async with asyncio.timeout(10):
        assert await task == 0


async def test_while_draining_health_and_new_requests_are_503(client: Client) -> None:
    client.app[ENGINE_KEY].drain("the server is shutting down")
    for resp in (await client.get("/health"), await client.post("/generate", json={"text": "hi"})):
        assert resp.status == 503
        assert (await resp.json())["error"]["type"] == "shutting_down"
    resp = await client.post("/v1/completions", json={"model": "fake-base", "prompt": "hi"})
    assert (await resp.json())["error"]["code"] == "shutting_down"
