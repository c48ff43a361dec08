"""A client that goes away aborts its request, streaming or not (server run as `serve` runs it)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from yarl import URL

from tests.http.fake_engine import FakeEngine


@pytest.mark.parametrize("style", ["generator", "object"])
async def test_disconnect_mid_stream_aborts(live_url: str, engine: FakeEngine, style: str) -> None:
    engine.stream_style = style
    engine.chunk_delay_s = 0.01
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 10_000}, "stream": True}
    body["rid"] = "stream-1"
    async with asyncio.timeout(5), aiohttp.ClientSession() as session:
        resp = await session.post(f"{live_url}/generate", json=body)
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data: {")
        resp.close()  # drops the connection
        await engine.abort_seen.wait()
    assert engine.aborted == ["stream-1"]


async def test_disconnect_while_waiting_cancels_generate(live_url: str, engine: FakeEngine) -> None:
    engine.hold = True
    url = URL(live_url)
    payload = json.dumps({"text": ["a", "b"], "rid": ["w1", "w2"]}).encode()
    request = (
        f"POST /generate HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    async with asyncio.timeout(5):
        _, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(request)
        await writer.drain()
        await engine.started.wait()
        writer.close()
        await writer.wait_closed()
        await engine.abort_seen.wait()
    assert engine.aborted == ["w1", "w2"]
    async with asyncio.timeout(5), aiohttp.ClientSession() as session:
        resp = await session.get(f"{live_url}/health")
        assert resp.status == 200


async def test_connected_client_gets_its_answer(live_url: str, engine: FakeEngine) -> None:
    engine.hold = True
    async with asyncio.timeout(5), aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(session.post(f"{live_url}/generate", json={"text": "a"}))
        await engine.started.wait()
        engine.release.set()
        resp = await pending
        assert resp.status == 200
        assert (await resp.json())["text"]
    assert engine.aborted == []
