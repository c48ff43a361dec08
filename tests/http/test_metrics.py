"""/metrics: Prometheus text that parses, per-app registries, scrape-time gauges, and counters
that equal what the real engine did (tokens, requests by finish reason, TTFT/ITL counts, adapter
loads and evictions). Also: the CLI applies --log-level.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import openai
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorasrv import cli
from lorasrv.engine.engine import Engine
from lorasrv.engine.requests import Submission
from lorasrv.metrics import ADAPTER_STATES
from tests.fakes import FakeRunner
from tests.http.conftest import Client, MakeClient
from tests.http.real_server import (
    BASE,
    KEY,
    NUM_KV_PAGES,
    Server,
    expect,
    real_server,
    wait_until,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S = 10


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(f"{url}/metrics", headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await resp.text())


# ----------------------------------------------------------------------------- app client


async def test_metrics_parse_with_scrape_time_gauges(
    client: Client, engine: Engine, runner: FakeRunner
) -> None:
    runner.gate.clear()  # the request's first step waits: it stays running while we scrape
    handle = engine.submit(Submission(text="hello", lora_name="a"))
    await wait_until(lambda: engine.last_stats.num_running == 1, "the request is running")
    resp = await client.get("/metrics")
    assert resp.status == 200
    samples = parse(await resp.text())
    runner.gate.set()
    await handle.result()
    used = engine.last_stats.num_kv_pages_used
    assert value(samples, "lorasrv_num_running_requests") == 1
    assert value(samples, "lorasrv_num_waiting_requests") == 0
    assert value(samples, "lorasrv_kv_pages") == NUM_KV_PAGES
    pages_used = value(samples, "lorasrv_kv_pages_used")
    assert pages_used == 2  # "hello" and its first token: 6 tokens in pages of 4
    assert value(samples, "lorasrv_kv_page_usage_ratio") == pytest.approx(2 / NUM_KV_PAGES)
    assert used == 0  # and freed once it finished
    assert value(samples, "lorasrv_engine_healthy") == 1
    assert value(samples, "lorasrv_adapters_registered") == 2
    expected = {"a": "gpu_resident", "b": "cpu_loaded"}
    for name, state in expected.items():
        states = {
            dict(labels)["state"]: v
            for (metric, labels), v in samples.items()
            if metric == "lorasrv_adapter_state" and dict(labels)["adapter"] == name
        }
        assert states == {s: float(s == state) for s in ADAPTER_STATES}
        assert value(samples, "lorasrv_adapter_gpu_resident", adapter=name) == (name == "a")
        assert (value(samples, "lorasrv_adapter_slot", adapter=name) >= 0) == (name == "a")
        assert value(samples, "lorasrv_adapter_refs", adapter=name) == (name == "a")
        assert ("lorasrv_adapter_loads_total", frozenset({("adapter", name)})) in samples


async def test_request_counters_after_openai_traffic(client: Client) -> None:
    for model, n in (("a", 2), (BASE, 1)):
        body = {"model": model, "prompt": "abc", "max_tokens": 3, "n": n}
        assert (await client.post("/v1/completions", json=body)).status == 200
    resp = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert resp.status == 404
    samples = parse(await (await client.get("/metrics")).text())
    requests = "lorasrv_requests_total"
    assert value(samples, requests, adapter="a", finish_reason="length") == 2
    assert value(samples, requests, adapter="", finish_reason="length") == 1
    assert value(samples, "lorasrv_generation_tokens_total", adapter="a") == 6
    assert value(samples, "lorasrv_prompt_tokens_total", adapter="a") == 6
    assert value(samples, "lorasrv_time_to_first_token_seconds_count", adapter="") == 1
    assert value(samples, "lorasrv_inter_token_latency_seconds_count") == 3 * 2
    http = "lorasrv_http_requests_total"
    route = {"method": "POST", "route": "/v1/completions"}
    assert value(samples, http, status="200", **route) == 2
    assert value(samples, http, status="404", **route) == 1


async def test_each_app_has_its_own_registry(make_client: MakeClient) -> None:
    client_one, client_two = await make_client(), await make_client()
    body = {"model": BASE, "prompt": "x", "max_tokens": 2}
    assert (await client_one.post("/v1/completions", json=body)).status == 200
    first = parse(await (await client_one.get("/metrics")).text())
    second = parse(await (await client_two.get("/metrics")).text())
    assert value(first, "lorasrv_generation_tokens_total", adapter="") == 2
    assert value(second, "lorasrv_generation_tokens_total", adapter="") == 0
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("lorasrv") for name in global_names)


# ----------------------------------------------------------------------------- real engine


async def test_counters_equal_what_the_engine_did() -> None:
    async with asyncio.timeout(TIMEOUT_S), real_server() as server:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        tokens: dict[str, int] = {"a": 0, "b": 0, "c": 0, "": 0}
        prompts: dict[str, int] = dict.fromkeys(tokens, 0)
        num_requests = dict.fromkeys(tokens, 0)
        async with aiohttp.ClientSession() as session:
            load = {"lora_name": "c", "lora_path": "/ad/c"}  # 3 adapters, 2 slots: evictions
            async with session.post(f"{server.url}/load_lora_adapter", json=load, headers=AUTH):
                pass
            for i, model in enumerate(["a", f"{BASE}:b", "c", BASE, "a", "c", "b"]):
                lora = model.rpartition(":")[2] if model != BASE else ""
                answer = await client.completions.create(
                    model=model, prompt=f"p{i}" * (i + 1), max_tokens=3 + i, temperature=0, n=2
                )
                assert answer.choices[0].text == expect(f"p{i}" * (i + 1), lora or None, 3 + i)
                assert answer.usage is not None
                tokens[lora] += answer.usage.completion_tokens
                prompts[lora] += 2 * answer.usage.prompt_tokens  # two engine requests
                num_requests[lora] += 2
            body = {"text": "zz", "lora_path": "gone", "sampling_params": {"max_new_tokens": 2}}
            async with session.post(f"{server.url}/generate", json=body, headers=AUTH) as resp:
                assert resp.status == 404
            samples = await scrape(session, server.url)
    for lora, count in tokens.items():
        assert value(samples, "lorasrv_generation_tokens_total", adapter=lora) == count, lora
        assert value(samples, "lorasrv_prompt_tokens_total", adapter=lora) == prompts[lora]
        finished = value(samples, "lorasrv_requests_total", adapter=lora, finish_reason="length")
        assert finished == num_requests[lora]
        ttft = value(samples, "lorasrv_time_to_first_token_seconds_count", adapter=lora)
        assert ttft == num_requests[lora]
    total_requests = sum(num_requests.values())
    assert value(samples, "lorasrv_inter_token_latency_seconds_count") == (
        sum(tokens.values()) - total_requests
    )
    assert value(samples, "lorasrv_e2e_request_latency_seconds_count") == total_requests
    assert value(samples, "lorasrv_request_errors_total", code="adapter_not_found") == 1
    unknown = value(samples, "lorasrv_requests_total", adapter="<unknown>", finish_reason="error")
    assert unknown == 1
    assert not [key for key in samples if ("adapter", "gone") in key[1]]
    # adapter series, read from the adapter manager at scrape time
    assert value(samples, "lorasrv_adapters_registered") == 3
    assert value(samples, "lorasrv_kv_pages") == NUM_KV_PAGES
    assert value(samples, "lorasrv_kv_pages_used") == 0
    for name in ("a", "b", "c"):
        states = [v for (metric, labels), v in samples.items()
                  if metric == "lorasrv_adapter_state" and ("adapter", name) in labels]  # fmt: skip
        assert sorted(states) == [0, 0, 0, 0, 0, 1]
        assert value(samples, "lorasrv_adapter_loads_total", adapter=name) >= 1
    evictions = sum(
        value(samples, "lorasrv_adapter_evictions_total", adapter=name) for name in "abc"
    )
    assert evictions >= 1
    resident = sum(value(samples, "lorasrv_adapter_gpu_resident", adapter=n) for n in "abc")
    assert resident <= 2  # two GPU slots


async def test_an_abandoned_stream_counts_as_abort() -> None:
    async with asyncio.timeout(TIMEOUT_S), real_server() as server:
        server.runner.step_delay_s = 0.005
        await _abandon_stream(server)
        engine = server.engine
        await wait_until(lambda: engine.last_stats.num_aborted == 1, "the scheduler aborted it")
        async with aiohttp.ClientSession() as session:
            samples = await scrape(session, server.url)
    aborted = value(samples, "lorasrv_requests_total", adapter="a", finish_reason="abort")
    assert aborted == 1
    assert value(samples, "lorasrv_num_running_requests") == 0


async def _abandon_stream(server: Server) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    stream = await client.completions.create(
        model="a", prompt="long", max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    async for _ in stream:
        break
    await stream.close()


# ----------------------------------------------------------------------------- logging


def test_cli_applies_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr("lorasrv.http.app.serve", lambda config, make_engine, sockets: 0)
    assert cli.main(["--log-level", "debug", "--api-key", "sk-secret", "--port", "0"]) == 0
    assert seen["level"] == "DEBUG"
    for field in ("%(asctime)s", "%(levelname)s", "%(name)s"):
        assert field in seen["format"]


def test_draining_adapter_version_gives_no_duplicate_series() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from lorasrv.ids import AdapterId
    from lorasrv.messages import AdapterStatus
    from lorasrv.metrics import _adapter_families

    def status(adapter_id: int, state: str) -> AdapterStatus:
        return AdapterStatus(name="x", path="/p", adapter_id=AdapterId(adapter_id), state=state,
                             slot=None, rank=8, pinned=False, num_refs=0)  # fmt: skip

    from prometheus_client import CollectorRegistry, generate_latest

    class Collector:
        def collect(self):  # type: ignore[no-untyped-def]
            return _adapter_families([status(1, "unloading"), status(2, "cpu_loaded")])

    registry = CollectorRegistry()
    registry.register(Collector())  # type: ignore[arg-type]
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    assert families["lorasrv_adapters_registered"].samples[0].value == 1
    states = [s for s in families["lorasrv_adapter_state"].samples if s.value == 1]
    assert [(s.labels["adapter"], s.labels["state"]) for s in states] == [("x", "cpu_loaded")]
