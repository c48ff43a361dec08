"""The routed ingress answers like `python -m lorasrv`: the same requests to a single server and to
two in-process replicas behind RoutedEngine give the same bodies (ids and timings aside), and
admin operations reach every replica. Ray itself is in test_ray_serve.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.deploy.inproc import Routed, core, routed_server
from tests.http.real_server import ADAPTERS, BASE, KEY, real_server, server_config

TIMEOUT_S = 20
CONFIG = server_config(api_key=KEY)  # what real_server() runs the single server with
AUTH = {"Authorization": f"Bearer {KEY}"}
VOLATILE = frozenset({"id", "e2e_latency", "created"})

SAMPLING = {"max_new_tokens": 6, "temperature": 0}
REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/generate", {"text": ["hi", "hey", "yo", "sup"],
                           "lora_path": ["a", None, "b", "a"], "sampling_params": SAMPLING}),
    ("POST", "/generate", {"input_ids": [104, 105], "lora_path": "b",
                           "sampling_params": {**SAMPLING, "stop": ["x"]},
                           "return_logprob": True, "top_logprobs_num": 2}),
    ("POST", "/v1/completions", {"model": "a", "prompt": ["abc", "de"], "max_tokens": 5,
                                 "temperature": 0, "n": 2, "logprobs": 1}),
    ("POST", "/v1/chat/completions", {"model": f"{BASE}:b", "max_tokens": 4, "temperature": 0,
                                      "messages": [{"role": "user", "content": "q"}]}),
    ("POST", "/generate", {"text": "n", "lora_path": "a",  # SGLang's n: two samples
                           "sampling_params": {**SAMPLING, "n": 2, "temperature": 0.5,
                                               "seed": 7}}),
    ("GET", "/v1/models", {}),
    ("GET", "/get_model_info", {}),
    # errors: the HTTP layer's own status and body
    ("POST", "/generate", {"text": "hi", "lora_path": "nope", "sampling_params": SAMPLING}),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"temperature": -1}}),
    ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}),
    ("POST", "/load_lora_adapter", {"lora_name": "a", "lora_path": "/ad/c"}),
    ("POST", "/load_lora_adapter", {"lora_name": "bad name!", "lora_path": "/ad/c"}),
    ("POST", "/unload_lora_adapter", {"lora_name": "zz"}),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "zz", "lora_path": "/ad/nowhere"}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "zz"}),
    # the replicas' tokenizer, at the ingress
    ("POST", "/tokenize", {"prompt": ["hello", "hi"]}),
    ("POST", "/detokenize", {"tokens": [104, 105]}),
    ("GET", "/health_generate", {}),
]  # fmt: skip


def scrub(value: Any) -> Any:
    """The body without what differs between any two runs (ids, clocks)."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


async def ask(url: str, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.request(method, url + path, json=body or None) as response,
    ):
        if response.content_type != "application/json":
            return response.status, await response.text()
        return response.status, scrub(await response.json())


async def stream_events(url: str, path: str, body: dict[str, Any]) -> dict[Any, list[Any]]:
    """A stream's events, scrubbed, per output (`index` of a /generate batch, OpenAI's choice)."""
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.post(url + path, json={**body, "stream": True}) as response,
    ):
        events = [line for line in (await response.text()).splitlines() if line]
    assert events[-1] == "data: [DONE]"
    per_output: dict[Any, list[Any]] = {}
    for event in events[:-1]:
        data = scrub(json.loads(event[len("data: ") :]))
        choices = data.get("choices") or [{}]
        key = data.get("index", choices[0].get("index"))
        per_output.setdefault(key, []).append(data)
    return per_output


STREAMS: list[tuple[str, dict[str, Any]]] = [
    ("/generate", {"text": "hello", "lora_path": "a", "sampling_params": SAMPLING}),
    ("/generate", {"text": ["x", "y"], "lora_path": ["a", None], "sampling_params": SAMPLING}),
    ("/v1/chat/completions", {"model": "b", "max_tokens": 5, "temperature": 0, "n": 2,
                              "messages": [{"role": "user", "content": "q"}],
                              "stream_options": {"include_usage": True}}),
]  # fmt: skip


@pytest.fixture
async def routed() -> AsyncIterator[Routed]:
    async with asyncio.timeout(TIMEOUT_S), routed_server(CONFIG) as server:
        yield server


async def test_routed_answers_equal_the_single_server(routed: Routed) -> None:
    async with asyncio.timeout(TIMEOUT_S), real_server() as single:
        for method, path, body in REQUESTS:
            expected = await ask(single.url, method, path, body)
            got = await ask(routed.url, method, path, body)
            assert got == expected, (path, body)
        for path, body in STREAMS:
            expected_events = await stream_events(single.url, path, body)
            assert await stream_events(routed.url, path, body) == expected_events, body
    # The 4-row batch went out as one call per adapter: a (2 rows), base, b.
    first = sorted((lora or "", rows) for lora, _, rows in routed.replicas.calls[:3])
    assert first == [("", 1), ("a", 2), ("b", 1)]


async def adapters_of(routed: Routed) -> list[set[str]]:
    return [
        {s.name for s in await replica.engine.describe_adapters()}
        for replica in routed.replicas.cores
    ]


async def test_load_and_unload_reach_every_replica(routed: Routed) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        assert await adapters_of(routed) == [{"a", "b"}, {"a", "b"}]
        status, body = await ask(
            routed.url, "POST", "/load_lora_adapter", {"lora_name": "c", "lora_path": "/ad/c"}
        )
        assert (status, body["success"]) == (200, True)
        assert body["loaded_adapters"] == {**ADAPTERS, "c": "/ad/c"}
        # Unpinned: registered for all, loaded where it routes (proved loadable there).
        held = await adapters_of(routed)
        assert sorted("c" in names for names in held) == [False, True]
        pinned = {"lora_name": "d", "lora_path": "/ad/d", "pinned": True}
        assert (await ask(routed.url, "POST", "/load_lora_adapter", pinned))[0] == 200
        assert all("d" in names for names in await adapters_of(routed))  # pinned: everywhere
        status, body = await ask(routed.url, "POST", "/unload_lora_adapter", {"lora_name": "a"})
        assert (status, body["success"]) == (200, True)
        assert all("a" not in names for names in await adapters_of(routed))
        status, body = await ask(routed.url, "POST", "/generate", {"text": "hi", "lora_path": "a"})
        assert status == 404
        status, body = await ask(
            routed.url, "POST", "/load_lora_adapter", {"lora_name": "e", "lora_path": "/ad/zz"}
        )
        assert status == 400
        assert "/ad/zz" in body["error_message"]
        assert "e" not in body["loaded_adapters"]  # a failed load leaves no trace
        assert all("e" not in names for names in await adapters_of(routed))


async def test_a_restarted_replica_follows_the_registry(routed: Routed) -> None:
    """A replica that starts after an unload does not bring the adapter back (config seeds the
    registry once), and drops it from its own engine."""
    async with asyncio.timeout(TIMEOUT_S):
        await ask(routed.url, "POST", "/unload_lora_adapter", {"lora_name": "b"})
        await routed.replicas.cores[1].stop()
        fresh = core(CONFIG, routed.registry, "r1b")
        await fresh.start()
        routed.replicas.cores[1] = fresh
        assert {s.name for s in await fresh.engine.describe_adapters()} == {"a"}
        _status, body = await ask(routed.url, "GET", "/v1/models", {})
        assert [card["root"] for card in body["data"]] == ["/fake/model", "/ad/a"]
