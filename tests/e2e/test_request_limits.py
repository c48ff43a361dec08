"""Over HTTP with the real engine: a huge prompt is refused by its size before anything tokenizes
it, and prompts long enough to tokenize slowly never stall other requests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import make_checkpoint, server_config


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("limits"), max_position_embeddings=8192)


async def test_a_10mb_prompt_is_refused_at_once(base: Path, lorasrv_client: Any) -> None:
    client = await lorasrv_client(server_config(base, context_length=256))
    started = time.monotonic()
    for body in (
        {"text": "hello world " * 900_000},  # ~10 MB
        {"text": ["hi", "hello world " * 900_000]},
    ):
        resp = await client.post("/generate", json=body)
        assert resp.status == 413, await resp.text()
        assert "characters; at most" in (await resp.json())["error"]["message"]
    chat = {"model": "x", "messages": [{"role": "user", "content": "hello world " * 900_000}]}
    resp = await client.post("/v1/chat/completions", json={**chat, "model": await model(client)})
    assert resp.status == 413, await resp.text()
    # Tokenizing 10 MB on the event loop took 16-22 s here; the refusal needs no tokenizer.
    assert time.monotonic() - started < 5


async def model(client: Any) -> str:
    return str((await (await client.get("/v1/models")).json())["data"][0]["id"])


async def test_long_prompts_do_not_stall_other_requests(base: Path, lorasrv_client: Any) -> None:
    # 8192 tokens of context: ~300 K characters may fit, and encoding them takes ~0.5 s.
    client = await lorasrv_client(server_config(base, context_length=8192))
    near_limit = "hello world, " * 23_000  # under the character bound, over 8192 tokens
    posts = [
        asyncio.create_task(client.post("/generate", json={"text": near_limit})) for _ in range(4)
    ]
    worst = await health_gaps_while(client, posts)
    for post in posts:
        resp = await post
        assert resp.status == 413, await resp.text()  # counted in tokens, after encoding
        assert "context length" in await resp.text()
    print(f"worst /health latency {worst:.3f} s")
    assert worst < 0.5, f"/health waited {worst:.2f} s behind prompt encoding"


async def health_gaps_while(client: Any, posts: list[asyncio.Task[Any]]) -> float:
    """The longest gap between two /health answers (or the last one and the end) while `posts`
    run. NOTE: client and server share this event loop, so a stalled loop shows as a long gap
    wherever the stall falls."""
    worst, last = 0.0, time.monotonic()
    while not all(p.done() for p in posts):
        resp = await client.get("/health")
        assert resp.status == 200
        now = time.monotonic()
        worst, last = max(worst, now - last), now
        await asyncio.sleep(0.01)
    return max(worst, time.monotonic() - last)


async def test_tokenize_and_detokenize_run_off_the_event_loop(
    base: Path, lorasrv_client: Any
) -> None:
    client = await lorasrv_client(server_config(base, context_length=256))
    text = "hello world, " * 100_000  # 1.3 MB: encoding takes seconds here
    post = asyncio.create_task(client.post("/tokenize", json={"prompt": text}))
    worst = await health_gaps_while(client, [post])
    resp = await post
    assert resp.status == 200, await resp.text()
    ids = (await resp.json())["tokens"]
    assert len(ids) > 100_000
    assert worst < 0.5, f"/health waited {worst:.2f} s behind /tokenize"
    post = asyncio.create_task(client.post("/detokenize", json={"tokens": ids}))
    worst = await health_gaps_while(client, [post])
    resp = await post
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["text"].endswith("hello world, ")
    assert worst < 0.5, f"/health waited {worst:.2f} s behind /detokenize"
