"""Fixtures for HTTP tests: a FakeEngine, an app client over it, and a live loopback server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from lorasrv.config import ServerConfig, build_config
from lorasrv.http.app import build_app, make_runner
from tests.http.fake_engine import FakeEngine

CLIENT_TIMEOUT_S = 10  # no request in these tests may hang
MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_client(aiohttp_client: Any, engine: FakeEngine) -> MakeClient:
    """`await make_client(api_key=..., client_max_size=...)`: an app over the `engine` fixture."""

    async def make(
        client_max_size: int | None = None, **options: Any
    ) -> TestClient[web.Request, web.Application]:
        config = build_config(options) if options else engine.config
        engine.config = config
        app = (
            build_app(config, engine)
            if client_max_size is None
            else build_app(config, engine, client_max_size=client_max_size)
        )
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            app, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        )
        return client

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> TestClient[web.Request, web.Application]:
    return await make_client()


@pytest.fixture
async def live_url(engine: FakeEngine) -> AsyncIterator[str]:
    """The app behind `make_runner` (as `serve` runs it) on a free loopback port."""
    runner = make_runner(build_app(ServerConfig(), engine), access_log=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def sse_events(raw: bytes) -> list[str]:
    """Split an SSE body into `data:` payloads, checking the framing on the way."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-40:]
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        assert "\n" not in block, block
        events.append(block[len("data: ") :])
    return events


def sse_json(events: list[str]) -> list[dict[str, Any]]:
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    return [json.loads(event) for event in events[:-1]]
