"""Drop-in for SGLang clients (issue 14), against a live server over the real engine: `n` on
/generate, per-prompt `lora_path` on /v1/completions and `model` winning over it, LoRA off named as
such, /abort_request, /tokenize and /detokenize, and pinning an adapter the host cap dropped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.http.conftest import sse_events, sse_json
from tests.http.real_server import BASE, KEY, Server, expect, real_server, wait_until

TIMEOUT_S = 10
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def live() -> AsyncIterator[Server]:
    async with asyncio.timeout(TIMEOUT_S), real_server() as server:
        yield server


async def post(server: Server, route: str, body: dict[str, Any], status: int = 200) -> Any:
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.post(f"{server.url}{route}", json=body) as resp,
    ):
        assert resp.status == status, await resp.text()
        if resp.content_type == "application/json":
            return await resp.json()
        return await resp.read()


def client_of(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S
    )


async def test_n_gives_n_outputs_per_prompt_each_with_its_own_seed(live: Server) -> None:
    body = {"text": ["p", "q"], "lora_path": ["a", None], "rid": ["r", "s"],
            "sampling_params": {"n": 2, "max_new_tokens": 3, "sampling_seed": 9}}  # fmt: skip
    out = await post(live, "/generate", body)
    assert [item["meta_info"]["id"] for item in out] == ["r_0", "r_1", "s_0", "s_1"]
    assert [item["text"] for item in out] == [expect("p", "a", 3)] * 2 + [expect("q", None, 3)] * 2
    seeds = sorted((seq.prompt_ids, seq.params.seed) for seq in live.runner.new_seqs())
    assert seeds == [((ord("p"),), 9), ((ord("p"),), 10), ((ord("q"),), 9), ((ord("q"),), 10)]
    single = await post(live, "/generate", {"text": "p", "sampling_params": {"n": 3}})
    assert isinstance(single, list)  # n > 1 answers a list, as SGLang does
    assert len(single) == 3
    assert len({item["meta_info"]["id"] for item in single}) == 3


async def test_n_streams_with_an_index_per_output(live: Server) -> None:
    body = {"text": "p", "stream": True, "sampling_params": {"n": 2, "max_new_tokens": 3}}
    raw = await post(live, "/generate", body)
    chunks = sse_json(sse_events(raw))
    for index in (0, 1):
        mine = [c for c in chunks if c["index"] == index]
        assert mine[-1]["text"] == expect("p", None, 3)
        assert mine[-1]["meta_info"]["finish_reason"]["type"] == "length"


async def test_completions_take_one_lora_path_per_prompt(live: Server) -> None:
    client = client_of(live)
    answer = await client.completions.create(
        model=BASE, prompt=["x", "y", "z"], max_tokens=3, temperature=0,
        extra_body={"lora_path": ["a", None, "b"]},
    )  # fmt: skip
    assert [c.text for c in answer.choices] == [
        expect("x", "a", 3), expect("y", None, 3), expect("z", "b", 3)
    ]  # fmt: skip


async def test_the_adapter_in_model_wins_over_lora_path(live: Server) -> None:
    client = client_of(live)
    for model in (f"{BASE}:a", "a"):
        answer = await client.completions.create(
            model=model, prompt="x", max_tokens=3, temperature=0, extra_body={"lora_path": "b"}
        )
        assert answer.choices[0].text == expect("x", "a", 3)


async def test_lora_off_says_so_and_names_the_adapter_and_the_flag() -> None:
    async with asyncio.timeout(TIMEOUT_S), real_server(enable_lora=False) as live:
        client = client_of(live)
        for kwargs in (
            {"model": f"{BASE}:x"},
            {"model": BASE, "extra_body": {"lora_path": "x"}},
        ):
            with pytest.raises(openai.BadRequestError) as bad:
                await client.completions.create(prompt="hi", max_tokens=2, **kwargs)
            for needle in ("LoRA is not enabled", "'x'", "--enable-lora"):
                assert needle in str(bad.value), str(bad.value)
        error = await post(live, "/generate", {"text": "hi", "lora_path": "x"}, status=400)
        assert "LoRA is not enabled" in error["error"]["message"]
        ok = await client.completions.create(model=BASE, prompt="hi", max_tokens=2)
        assert ok.choices[0].text == expect("hi", None, 2)


async def test_abort_request_by_rid_ends_it_with_finish_reason_abort(live: Server) -> None:
    engine, runner = live.engine, live.runner
    runner.gate.clear()
    long = {"sampling_params": {"max_new_tokens": 100, "ignore_eos": True}}
    victim = asyncio.ensure_future(post(live, "/generate", {"text": "v", "rid": "victim", **long}))
    other = asyncio.ensure_future(post(live, "/generate", {"text": "o", "rid": "other", **long}))
    await wait_until(lambda: set(engine.request_ids()) == {"victim", "other"}, "both in flight")
    assert await post(live, "/abort_request", {"rid": "victim"}) == b""
    assert await post(live, "/abort_request", {"rid": "no-such-request"}) == b""  # ignored
    runner.gate.set()
    aborted = await victim
    assert aborted["meta_info"]["finish_reason"] == {"type": "abort"}
    assert aborted["meta_info"]["id"] == "victim"
    assert (await other)["meta_info"]["finish_reason"]["type"] == "length"
    await wait_until(lambda: engine.last_stats.num_aborted == 1, "the scheduler aborted it")


async def test_abort_all(live: Server) -> None:
    engine, runner = live.engine, live.runner
    runner.gate.clear()
    body = {"text": ["a", "b"], "sampling_params": {"max_new_tokens": 50, "ignore_eos": True}}
    pending = asyncio.ensure_future(post(live, "/generate", body))
    await wait_until(lambda: len(engine.request_ids()) == 2, "both in flight")
    await post(live, "/abort_request", {"abort_all": True})
    runner.gate.set()
    out = await pending
    assert [item["meta_info"]["finish_reason"] for item in out] == [{"type": "abort"}] * 2
    await wait_until(lambda: engine.last_stats.num_aborted == 2, "the scheduler aborted both")


async def test_tokenize_and_detokenize(live: Server) -> None:
    one = await post(live, "/tokenize", {"prompt": "hi", "model": BASE})
    assert one == {"tokens": [104, 105], "count": 2, "max_model_len": 256}
    many = await post(live, "/tokenize", {"prompt": ["a", "bc"], "add_special_tokens": False})
    assert many == {"tokens": [[97], [98, 99]], "count": [1, 2], "max_model_len": 256}
    assert await post(live, "/detokenize", {"tokens": [104, 105]}) == {"text": "hi"}
    texts = await post(live, "/detokenize", {"tokens": [[97], [98, 99]]})
    assert texts == {"text": ["a", "bc"]}
    error = await post(live, "/detokenize", {"tokens": [1, 500]}, status=400)
    assert "token id 500 is outside the vocabulary" in error["error"]["message"]
    await post(live, "/detokenize", {"tokens": [1, [2]]}, status=400)


async def test_pinning_an_adapter_the_host_cap_dropped() -> None:
    """With --max-loaded-loras, lorasrv keeps a dropped adapter registered (SGLang forgets it):
    it stays in loaded_adapters, reloads on demand, and a pinned load of it pins it."""
    async with asyncio.timeout(TIMEOUT_S), real_server(max_loaded_loras=2) as capped:
        engine = capped.engine
        loaded = await post(capped, "/load_lora_adapter", {"lora_name": "c", "lora_path": "/ad/c"})
        states = {s.name: s.state for s in await engine.describe_adapters()}
        dropped = [name for name, state in states.items() if state == "unloaded"]
        assert len(dropped) == 1, states  # the host cap made room for c
        name = dropped[0]
        kept = next(n for n in ("a", "b") if n != name)
        assert set(loaded["loaded_adapters"]) == {"a", "b", "c"}  # still registered
        pin = {"lora_name": name, "lora_path": f"/ad/{name}", "pinned": True}
        answer = await post(capped, "/load_lora_adapter", pin)
        assert answer["success"] is True
        statuses = [s for s in await engine.describe_adapters() if s.name == name]
        assert [(s.pinned, s.state) for s in statuses] == [(True, "pinned")]
        body = {"text": "q", "lora_path": name, "sampling_params": {"max_new_tokens": 3}}
        assert (await post(capped, "/generate", body))["text"] == expect("q", name, 3)
        for again in (kept, "c"):  # unpinned, a registered name stays "already loaded"
            body = {"lora_name": again, "lora_path": f"/ad/{again}"}
            error = await post(capped, "/load_lora_adapter", body, status=400)
            assert "already been loaded" in error["error_message"]
