"""Over HTTP against a running server: greedy tokens identical to HF transformers on tiny random
checkpoints of every supported architecture, a batch of different lengths, 32 new tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import PROMPTS, greedy, make_checkpoint, reference_models, server_config

NUM_NEW = 32
GREEDY = {"max_new_tokens": NUM_NEW, "temperature": 0, "ignore_eos": True}


@pytest.mark.parametrize(
    "kind", ["llama", "llama_tied", "llama3_rope", "qwen2", "qwen3", "mistral"]
)
async def test_greedy_batch_matches_transformers(
    kind: str, tmp_path: Path, lorasrv_client: Any
) -> None:
    base = make_checkpoint(tmp_path, kind)
    hf = reference_models(base, {})[None]
    expected = [greedy(hf, p, NUM_NEW) for p in PROMPTS]
    assert any(len(set(e)) > 4 for e in expected), "degenerate model: proves nothing"
    client = await lorasrv_client(server_config(base))
    resp = await client.post("/generate", json={"input_ids": PROMPTS, "sampling_params": GREEDY})
    assert resp.status == 200, await resp.text()
    results = await resp.json()
    for prompt, want, got in zip(PROMPTS, expected, results, strict=True):
        assert got["output_ids"] == want, f"{kind}: prompt of {len(prompt)} tokens"
        assert got["meta_info"]["prompt_tokens"] == len(prompt)
        assert got["meta_info"]["completion_tokens"] == NUM_NEW


async def test_streaming_equals_non_streaming_and_text_round_trips(
    tmp_path: Path, lorasrv_client: Any
) -> None:
    base = make_checkpoint(tmp_path)
    client = await lorasrv_client(server_config(base))
    body = {"text": "The quick brown fox", "sampling_params": GREEDY}
    plain = await (await client.post("/generate", json=body)).json()
    resp = await client.post("/generate", json={**body, "stream": True})
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 1
    assert chunks[-1]["text"] == plain["text"]
    assert chunks[-1]["output_ids"] == plain["output_ids"]
    assert all(plain["text"].startswith(c["text"]) for c in chunks)
