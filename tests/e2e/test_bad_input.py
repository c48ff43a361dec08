"""Over HTTP with the real engine: every kind of bad input is a 4xx that names the problem, the
server keeps serving, and a client that disconnects frees its KV pages and adapter reference."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import make_adapters, make_checkpoint, server_config

GOOD = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
BAD: list[tuple[Any, int, str]] = [
    ("{not json", 400, "JSON"),
    ({"input_ids": "abc"}, 400, "input_ids"),
    ({"text": 5}, 400, "text"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": -3}}, 400, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 10**9}}, 400, "max_new_tokens"),
    ({"text": "hi", "sampling_params": {"temperature": -1}}, 400, "temperature"),
    ({"text": "hi", "sampling_params": {"top_p": 0}}, 400, "top_p"),
    ({"text": "hi", "sampling_params": {"top_p": 1.5}}, 400, "top_p"),
    ({"input_ids": [5, 99999]}, 400, "vocabulary"),
    ({"input_ids": [-1]}, 400, "vocabulary"),
    ({"text": ""}, 400, "empty"),
    ({"input_ids": []}, 400, "input_ids"),
    ({"input_ids": list(range(1, 300))}, 413, "context"),
    ({"text": "hi", "colour": "blue"}, 400, "colour"),
    ({"text": "hi", "sampling_params": {"colour": 1}}, 400, "colour"),
    ({"text": ["a", "b"], "lora_path": ["x"]}, 400, "lora_path"),
    ({"text": "hi", "lora_path": "no-such-adapter"}, 404, "no-such-adapter"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("bad")
    base = make_checkpoint(root, max_position_embeddings=8192)
    return base, make_adapters(base, root, ["qv_r4"])


async def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(
    paths: tuple[Path, dict[str, Path]], lorasrv_client: Any
) -> None:
    base, adapters = paths
    client = await lorasrv_client(
        server_config(base, lora_paths=[f"a={adapters['qv_r4']}"], context_length=256)
    )
    for body, status, needle in BAD:
        kwargs = {"data": body} if isinstance(body, str) else {"json": body}
        resp = await client.post("/generate", **kwargs)
        text = await resp.text()
        assert resp.status == status, (body, text)
        assert needle.lower() in text.lower(), (body, text)
        ok = await client.post("/generate", json=GOOD)
        assert ok.status == 200, (body, await ok.text())


async def test_disconnect_frees_pages_and_adapter_reference(
    paths: tuple[Path, dict[str, Path]], lorasrv_client: Any
) -> None:
    base, adapters = paths
    client = await lorasrv_client(server_config(base, lora_paths=[f"a={adapters['qv_r4']}"]))
    long = {"input_ids": [5, 6, 7], "lora_path": "a",
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}  # fmt: skip
    for stream in (True, False):
        task = asyncio.create_task(client.post("/generate", json={**long, "stream": stream}))
        async with asyncio.timeout(10):
            while (await server_info(client))["scheduler"]["num_running"] == 0:
                await asyncio.sleep(0.01)
        if stream:  # headers and a first chunk arrived: drop the connection mid-stream
            resp = await task
            await resp.content.readline()
            resp.close()
        else:  # still waiting for the whole answer: give up on it
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with asyncio.timeout(10):
            while True:
                info = await server_info(client)
                (adapter,) = info["adapters"]
                if info["scheduler"]["num_kv_pages_used"] == 0 and adapter["num_refs"] == 0:
                    break
                await asyncio.sleep(0.01)
        assert info["scheduler"]["num_running"] == 0
    # The scheduler itself ended both as aborts (not by running out their 4000 tokens).
    assert info["scheduler"]["num_aborted"] == 2
    assert info["scheduler"]["num_finished"] == 2  # nothing else ran on this server


async def server_info(client: Any) -> dict[str, Any]:
    resp = await client.get("/get_server_info")
    assert resp.status == 200
    info: dict[str, Any] = await resp.json()
    return info
