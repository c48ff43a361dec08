"""A client that goes away aborts its requests, streaming or not (a live server run as `serve` runs
it, over the real engine): the scheduler ends them as aborts and their adapter references go."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from yarl import URL

from tests.http.real_server import Server, expect, num_refs, wait_until

TIMEOUT_S = 5


async def test_disconnect_mid_stream_aborts(server: Server) -> None:
    engine, runner = server.engine, server.runner
    runner.step_delay_s = 0.002  # simulated GPU time: 200 tokens take a while
    body = {"text": "hi", "lora_path": "a", "rid": "stream-1", "stream": True,
            "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}  # fmt: skip
    async with asyncio.timeout(TIMEOUT_S), aiohttp.ClientSession() as session:
        resp = await session.post(f"{server.url}/generate", json=body)
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: {")
        resp.close()  # drops the connection
    await wait_until(lambda: engine.last_stats.num_aborted == 1, "the scheduler aborted it")
    assert engine.request_ids() == ()
    assert engine.last_stats.num_running == 0
    assert await num_refs(engine, "a") == 0
    assert engine.last_stats.num_kv_pages_used == 0


async def test_disconnect_while_waiting_cancels_generate(server: Server) -> None:
    engine, runner = server.engine, server.runner
    runner.gate.clear()  # the first step waits: the answer cannot come
    url = URL(server.url)
    payload = json.dumps({"text": ["a", "b"], "rid": ["w1", "w2"], "lora_path": "a"}).encode()
    request = (
        f"POST /generate HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    async with asyncio.timeout(TIMEOUT_S):
        _, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(request)
        await writer.drain()
        await wait_until(lambda: set(engine.request_ids()) == {"w1", "w2"}, "both submitted")
        await wait_until(lambda: runner.num_steps_started == 1, "their step is running")
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: engine.request_ids() == (), "the handler aborted both")
    runner.gate.set()
    await wait_until(lambda: engine.last_stats.num_aborted == 2, "the scheduler aborted both")
    assert await num_refs(engine, "a") == 0
    async with asyncio.timeout(TIMEOUT_S), aiohttp.ClientSession() as session:
        resp = await session.get(f"{server.url}/health")
        assert resp.status == 200


async def test_connected_client_gets_its_answer(server: Server) -> None:
    engine, runner = server.engine, server.runner
    runner.gate.clear()
    body = {"text": "a", "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    async with asyncio.timeout(TIMEOUT_S), aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(session.post(f"{server.url}/generate", json=body))
        await wait_until(lambda: runner.num_steps_started == 1, "its step is running")
        runner.gate.set()
        resp = await pending
        assert resp.status == 200
        assert (await resp.json())["text"] == expect("a", None, 3)
    assert engine.last_stats.num_aborted == 0
