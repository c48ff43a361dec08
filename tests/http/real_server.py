"""The real Engine (every actor) on FakeRunner and the character tokenizer, behind the real app:
exact, fast, and what every HTTP test talks to (aiohttp's test client, or a live loopback server
for the official `openai` client and disconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from aiohttp import web

from lorasrv.config import LoraRef, ServerConfig, build_config, lora_enabled
from lorasrv.engine.engine import Engine
from lorasrv.engine.parts import EngineParts
from lorasrv.http.app import build_app, make_runner
from lorasrv.peft_config import read_peft_config
from tests.actors.test_engine import SALTS, read_config
from tests.fakes import FakeRunner, FakeTokenizer, fake_generate

BASE = "fake-base"
KEY = "sk-test-key-77"
ADAPTERS = {"a": "/ad/a", "b": "/ad/b"}
NUM_KV_PAGES = 128
CONTEXT_LENGTH = 256  # FakeRunner's
WAIT_S = 5


class Server(NamedTuple):
    url: str
    engine: Engine
    runner: FakeRunner


def expect(prompt: str, lora: str | None, num: int) -> str:
    """What the fake model answers `prompt` (as character ids) with, under adapter `lora`."""
    salt = 0 if lora is None else SALTS[f"/ad/{lora}"]
    return "".join(chr(t) for t in fake_generate([ord(c) for c in prompt], salt, num))


def chat_prompt(messages: list[dict[str, str]]) -> str:
    """FakeTokenizer's chat template."""
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def server_config(**options: Any) -> ServerConfig:
    """CLI options (snake_case) over the fake server's defaults: adapters a and b, two slots."""
    defaults: dict[str, Any] = {
        "served_model_name": BASE,
        "enable_lora": True,
        "max_loras_per_batch": 2,
        "chunked_prefill_size": 32,
        "max_running_requests": 16,
    }
    return build_config({**defaults, **options})


def fake_engine(
    config: ServerConfig, runner: FakeRunner | None = None, *, adapters: bool = True
) -> Engine:
    """A real Engine whose parts are fakes: FakeRunner, FakeTokenizer, SALTS as adapter weights."""
    fake = runner or FakeRunner(num_kv_pages=NUM_KV_PAGES, page_size=4, num_slots=2)
    refs = config.adapters.lora_paths or (
        tuple(LoraRef(lora_name=n, lora_path=p) for n, p in ADAPTERS.items()) if adapters else ()
    )
    if not lora_enabled(config.adapters):
        refs = ()
    parts = EngineParts(
        model_path="/fake/model",
        runner_factory=lambda: fake,
        tokenizer=FakeTokenizer(),
        read_adapter_config=read_any_config,
        make_adapter_loader=lambda _runner: SALTS.__getitem__,
        initial_adapters=refs,
        config=config,
    )
    return Engine(config, parts=parts)


def read_any_config(path: str) -> Any:
    """A real folder's adapter_config.json through lorasrv's own reader (its refusals, word for
    word); else the fake adapters of SALTS."""
    if os.path.isdir(path):
        return read_peft_config(path)
    return read_config(path)


@contextlib.asynccontextmanager
async def real_server(
    *, api_key: str | None = KEY, runner: FakeRunner | None = None, **options: Any
) -> AsyncIterator[Server]:
    """The app as `serve` runs it (handler cancellation on) on a free loopback port."""
    fake = runner or FakeRunner(num_kv_pages=NUM_KV_PAGES, page_size=4, num_slots=2)
    config = server_config(api_key=api_key, **options)
    engine = fake_engine(config, fake)
    app_runner = make_runner(build_app(config, engine), access_log=False)
    await app_runner.setup()  # starts the engine
    try:
        site = web.TCPSite(app_runner, "127.0.0.1", 0)
        await site.start()
        host, port = app_runner.addresses[0][:2]
        yield Server(f"http://{host}:{port}", engine, fake)
    finally:
        fake.gate.set()  # a test that held the runner must not hold the shutdown
        await app_runner.cleanup()


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll observable state (never a fixed sleep) until `predicate()` holds."""
    try:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s} s: {what}") from None


async def num_refs(engine: Engine, name: str) -> int:
    return sum(s.num_refs for s in await engine.describe_adapters() if s.name == name)
