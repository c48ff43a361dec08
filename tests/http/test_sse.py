"""SSE framing of `/generate` with `stream: true`: cumulative chunks, `[DONE]` last, errors."""

from __future__ import annotations

import itertools

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.http.conftest import sse_events, sse_json
from tests.http.fake_engine import FakeEngine

Client = TestClient[web.Request, web.Application]

STREAM = {"text": "hi", "sampling_params": {"max_new_tokens": 4}, "stream": True}


@pytest.mark.parametrize("style", ["generator", "object"])
async def test_stream_framing_and_cumulative_text(
    client: Client, engine: FakeEngine, style: str
) -> None:
    engine.stream_style = style
    resp = await client.post("/generate", json={**STREAM, "lora_path": "demo-lora-a"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    chunks = sse_json(sse_events(await resp.read()))
    assert len(chunks) == 4
    texts = [chunk["text"] for chunk in chunks]
    assert texts[-1] == " demo-lora-a0 demo-lora-a1 demo-lora-a2 demo-lora-a3"
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert [len(chunk["output_ids"]) for chunk in chunks] == [1, 2, 3, 4]
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * 3
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert engine.calls[0][0] == "stream"
    assert engine.aborted == []


@pytest.mark.parametrize("style", ["generator", "object"])
async def test_error_before_first_chunk_keeps_its_status(
    client: Client, engine: FakeEngine, style: str
) -> None:
    engine.stream_style = style
    resp = await client.post("/generate", json={**STREAM, "lora_path": "nope"})
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["type"] == "adapter_not_found"


async def test_batch_cannot_be_streamed(client: Client) -> None:
    resp = await client.post("/generate", json={**STREAM, "text": ["a", "b"]})
    assert resp.status == 400
    assert "stream: text is a list" in (await resp.json())["error"]["message"]
    resp = await client.post("/generate", json={**STREAM, "text": None, "input_ids": [[1], [2]]})
    assert resp.status == 400
    assert "input_ids" in (await resp.json())["error"]["message"]


async def test_mid_stream_error_is_an_event_then_done(client: Client, engine: FakeEngine) -> None:
    engine.fail_after_chunks = 2
    resp = await client.post("/generate", json=STREAM)
    assert resp.status == 200
    events = sse_json(sse_events(await resp.read()))
    assert [len(event.get("output_ids", ())) for event in events[:2]] == [1, 2]
    assert events[2] == {
        "error": {"message": "engine stopped mid-request", "type": "engine_dead", "code": 503}
    }
    assert len(events) == 3
    resp = await client.post("/generate", json={"text": "still", "sampling_params": {}})
    assert resp.status == 200


async def test_mid_stream_bug_is_a_500_event(client: Client, engine: FakeEngine) -> None:
    engine.fail_after_chunks = 1
    engine.failure = RuntimeError("secret internals")
    resp = await client.post("/generate", json=STREAM)
    raw = await resp.read()
    assert b"secret internals" not in raw
    events = sse_json(sse_events(raw))
    assert events[-1]["error"] == {
        "message": "internal server error",
        "type": "internal_error",
        "code": 500,
    }
