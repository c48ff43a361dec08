"""SSE framing of `/generate` with `stream: true` over the real engine: cumulative chunks (a batch's
tagged with their `index`), `[DONE]` last, errors before the first chunk keep their status, later
ones are an event."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from lorasrv.http import sglang
from tests.fakes import FakeRunner
from tests.http.conftest import Client, sse_events, sse_json
from tests.http.real_server import expect

STREAM = {"text": "hi", "sampling_params": {"max_new_tokens": 4, "temperature": 0}, "stream": True}


async def test_stream_framing_and_cumulative_text(client: Client) -> None:
    resp = await client.post("/generate", json={**STREAM, "lora_path": "a"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    chunks = sse_json(sse_events(await resp.read()))
    texts = [chunk["text"] for chunk in chunks]
    assert texts[-1] == expect("hi", "a", 4)
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert [len(chunk["output_ids"]) for chunk in chunks] == [1, 2, 3, 4]
    assert [c["meta_info"]["finish_reason"] for c in chunks[:-1]] == [None] * 3
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert all("index" not in chunk for chunk in chunks)


async def test_a_batch_streams_with_an_index_per_prompt(client: Client) -> None:
    body = {**STREAM, "text": ["hi", "other"], "lora_path": ["a", None], "rid": ["r0", "r1"]}
    resp = await client.post("/generate", json=body)
    assert resp.status == 200
    chunks = sse_json(sse_events(await resp.read()))
    for index, (prompt, lora) in enumerate([("hi", "a"), ("other", None)]):
        mine = [c for c in chunks if c["index"] == index]
        assert [len(c["output_ids"]) for c in mine] == [1, 2, 3, 4]
        assert mine[-1]["text"] == expect(prompt, lora, 4)
        assert {c["meta_info"]["id"] for c in mine} == {f"r{index}"}


async def test_error_before_first_chunk_keeps_its_status(client: Client) -> None:
    resp = await client.post("/generate", json={**STREAM, "lora_path": "nope"})
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["type"] == "adapter_not_found"


async def test_mid_stream_engine_death_is_an_event_then_done(
    client: Client, runner: FakeRunner
) -> None:
    runner.fail_at_step = 3  # prefill (token 1), decode (token 2), then the crash
    body = {**STREAM, "sampling_params": {"max_new_tokens": 50, "ignore_eos": True}}
    resp = await client.post("/generate", json=body)
    assert resp.status == 200
    events = sse_json(sse_events(await resp.read()))
    assert [len(event.get("output_ids", ())) for event in events[:2]] == [1, 2]
    error = events[2]["error"]
    assert (error["type"], error["code"]) == ("engine_dead", 503)
    assert "fake GPU failure at step 3" in error["message"]
    assert len(events) == 3


async def test_mid_stream_bug_is_a_500_event(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sglang.generate_item
    calls = itertools.count()

    def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if next(calls) == 1:
            raise RuntimeError("secret internals")
        return real(*args, **kwargs)

    monkeypatch.setattr(sglang, "generate_item", broken)
    resp = await client.post("/generate", json=STREAM)
    raw = await resp.read()
    assert b"secret internals" not in raw
    events = sse_json(sse_events(raw))
    assert len(events) == 2
    assert events[-1]["error"] == {
        "message": "internal server error",
        "type": "internal_error",
        "code": 500,
    }
    monkeypatch.undo()
    assert (await client.post("/generate", json={"text": "still"})).status == 200
