"""Fixtures for HTTP tests: the real Engine on FakeRunner behind the real app, through aiohttp's
test client (`client`, `make_client`) or on a live loopback server (`server`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from lorasrv.engine.engine import Engine
from lorasrv.engine.request_handle import RequestHandle
from lorasrv.engine.requests import Submission
from lorasrv.http.app import build_app
from lorasrv.http.state import ENGINE_KEY
from tests.fakes import FakeRunner
from tests.http.real_server import NUM_KV_PAGES, Server, fake_engine, real_server, server_config

CLIENT_TIMEOUT_S = 10  # no request in these tests may hang
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner(num_kv_pages=NUM_KV_PAGES, page_size=4, num_slots=2)


@pytest.fixture
async def make_client(aiohttp_client: Any, runner: FakeRunner) -> AsyncIterator[MakeClient]:
    """`await make_client(api_key=..., client_max_size=...)`: the app over a fresh real engine
    on the `runner` fixture; options are CLI options (snake_case)."""

    runners = [runner]

    async def make(client_max_size: int | None = None, **options: Any) -> Client:
        config = server_config(**options)
        engine = fake_engine(config, runners.pop() if runners else None)  # a second: its own
        sizes = {} if client_max_size is None else {"client_max_size": client_max_size}
        client: Client = await aiohttp_client(
            build_app(config, engine, **sizes),
            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S),
        )
        return client

    yield make
    runner.gate.set()  # a test that held the runner must not hold the engine's shutdown


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


@pytest.fixture
def engine(client: Client) -> Engine:
    return client.app[ENGINE_KEY]


@pytest.fixture
def submitted(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[Submission]:
    """Every Submission the routes hand the engine (a spy on the real `Engine.submit`)."""
    seen: list[Submission] = []
    real = engine.submit

    def spy(submission: Submission) -> RequestHandle:
        seen.append(submission)
        return real(submission)

    monkeypatch.setattr(engine, "submit", spy)
    return seen


@pytest.fixture
async def server(runner: FakeRunner) -> AsyncIterator[Server]:
    """A live loopback server, no API key, run as `serve` runs it (handler cancellation)."""
    async with real_server(api_key=None, runner=runner) as live:
        yield live


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
