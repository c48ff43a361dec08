"""A real server on a loopback port over a real Engine (every actor) on FakeRunner and the character
tokenizer: exact, fast, and what the official `openai` client and /metrics tests talk to.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import NamedTuple

from aiohttp import web

from lorasrv.config import (
    AdapterConfig,
    HttpConfig,
    LoraRef,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)
from lorasrv.engine.engine import Engine
from lorasrv.engine.parts import EngineParts
from lorasrv.http.app import build_app, make_runner
from tests.actors.test_engine import SALTS, read_config
from tests.fakes import FakeRunner, FakeTokenizer, fake_generate

BASE = "fake-base"
KEY = "sk-test-key-77"
ADAPTERS = {"a": "/ad/a", "b": "/ad/b"}
NUM_KV_PAGES = 128


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


@contextlib.asynccontextmanager
async def real_server(*, api_key: str | None = KEY) -> AsyncIterator[Server]:
    fake = FakeRunner(num_kv_pages=NUM_KV_PAGES, page_size=4, lora_rows=16, salts=SALTS)
    config = ServerConfig(
        model=ModelConfig(served_model_name=BASE),
        adapters=AdapterConfig(enable_lora=True, max_loras_per_batch=2),
        scheduler=SchedulerConfig(chunked_prefill_size=32, max_running_requests=16),
        http=HttpConfig(api_key=api_key),
    )
    parts = EngineParts(
        model_path="/fake/model",
        runner_factory=lambda: fake,
        tokenizer=FakeTokenizer(),
        read_adapter_config=read_config,
        initial_adapters=tuple(LoraRef(lora_name=n, lora_path=p) for n, p in ADAPTERS.items()),
        config=config,
    )
    engine = Engine(config, parts=parts)
    runner = make_runner(build_app(config, engine), access_log=False)
    await runner.setup()  # starts the engine
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield Server(f"http://{host}:{port}", engine, fake)
    finally:
        await runner.cleanup()
