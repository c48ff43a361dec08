"""Drop-in for vLLM clients (issue 14): `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` as
vLLM answers them, driven with the official `openai` client against a live server over the real
engine: plain-text success, OpenAI-shaped errors whose text names the cause, 404 for what is not
there, and `load_inplace`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.actors.test_engine import SALTS
from tests.fakes import fake_generate
from tests.http.real_server import KEY, Server, expect, real_server, wait_until

TIMEOUT_S = 10


@pytest.fixture
async def live() -> AsyncIterator[Server]:
    async with asyncio.timeout(TIMEOUT_S), real_server() as server:
        yield server


def client_of(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S
    )


async def load(client: openai.AsyncOpenAI, **body: Any) -> str:
    text: str = await client.post("/load_lora_adapter", body=body, cast_to=str)
    return text


async def unload(client: openai.AsyncOpenAI, **body: Any) -> str:
    text: str = await client.post("/unload_lora_adapter", body=body, cast_to=str)
    return text


def salted(text: str, path: str, num: int) -> str:
    return "".join(chr(t) for t in fake_generate([ord(c) for c in text], SALTS[path], num))


async def test_success_is_vllms_plain_text(live: Server) -> None:
    client = client_of(live)
    answer = await load(client, lora_name="c", lora_path="/ad/c")
    assert answer == "Success: LoRA adapter 'c' added successfully."
    done = await client.completions.create(model="c", prompt="hi", max_tokens=4, temperature=0)
    assert done.choices[0].text == salted("hi", "/ad/c", 4)
    assert "c" in [m.id for m in (await client.models.list()).data]
    answer = await unload(client, lora_name="c")
    assert answer == "Success: LoRA adapter 'c' removed successfully."
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="c", prompt="hi", max_tokens=4)


def adapter_folder(root: Path, name: str, **config: Any) -> str:
    folder = root / name
    folder.mkdir()
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **config}))
    return str(folder)


async def test_errors_name_the_cause_with_vllms_status(live: Server, tmp_path: Path) -> None:
    client = client_of(live)
    refused = {
        "max_lora_rank": adapter_folder(tmp_path, "big", r=64),
        "DoRA": adapter_folder(tmp_path, "dora", use_dora=True),
        "bias": adapter_folder(tmp_path, "bias", bias="all"),
        "modules_to_save": adapter_folder(tmp_path, "mts", modules_to_save=["lm_head"]),
    }
    for cause, path in refused.items():
        with pytest.raises(openai.BadRequestError) as bad:
            await load(client, lora_name="x", lora_path=path)
        assert cause in str(bad.value), str(bad.value)
        assert bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="has already been loaded"):
        await load(client, lora_name="a", lora_path="/ad/c")
    with pytest.raises(openai.NotFoundError, match="no adapter found at '/no/such/folder'") as gone:
        await load(client, lora_name="x", lora_path="/no/such/folder")
    assert gone.value.code == "adapter_not_found"
    error = gone.value.body
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}  # OpenAI's error object
    with pytest.raises(openai.NotFoundError, match="'nope' cannot be found"):
        await unload(client, lora_name="nope")
    with pytest.raises(openai.BadRequestError, match="lora_path must not be empty"):
        await load(client, lora_name="x", lora_path="")
    with pytest.raises(openai.BadRequestError, match="adapter name must not be empty"):
        await load(client, lora_name="", lora_path="/ad/c")
    still = await client.completions.create(model="a", prompt="ok", max_tokens=2, temperature=0)
    assert still.choices[0].text == expect("ok", "a", 2)


async def test_load_inplace_serves_new_requests_new_weights(live: Server) -> None:
    """Running requests finish on the version they started with; later ones get the new one,
    a fresh adapter version (new id), so nothing cached for the old one is reused."""
    client, engine, runner = client_of(live), live.engine, live.runner
    (before,) = [s for s in await engine.describe_adapters() if s.name == "a"]
    runner.gate.clear()  # the first request's first step waits: it is running when we replace
    first = asyncio.ensure_future(
        client.completions.create(model="a", prompt="old", max_tokens=6, temperature=0)
    )
    await wait_until(lambda: engine.last_stats.num_running == 1, "the first request runs")
    answer = await load(client, lora_name="a", lora_path="/ad/a2", load_inplace=True)
    assert answer == "Success: LoRA adapter 'a' added successfully."
    second = asyncio.ensure_future(
        client.completions.create(model="a", prompt="new", max_tokens=6, temperature=0)
    )
    await wait_until(lambda: len(engine.request_ids()) == 2, "the second request is in")
    runner.gate.set()
    assert (await first).choices[0].text == salted("old", "/ad/a", 6)
    assert (await second).choices[0].text == salted("new", "/ad/a2", 6)
    statuses = [s for s in await engine.describe_adapters() if s.name == "a"]
    assert [(s.path, s.state != "unloading") for s in statuses][-1] == ("/ad/a2", True)
    assert statuses[-1].adapter_id != before.adapter_id
    # load_inplace false (the default) on a loaded name is refused, as in vLLM
    with pytest.raises(openai.BadRequestError, match="already been loaded"):
        await load(client, lora_name="a", lora_path="/ad/c", load_inplace=False)


async def test_a_refused_in_place_load_leaves_the_old_version_serving(live: Server) -> None:
    client = client_of(live)
    with pytest.raises(openai.NotFoundError):
        await load(client, lora_name="a", lora_path="/no/such", load_inplace=True)
    done = await client.completions.create(model="a", prompt="hi", max_tokens=3, temperature=0)
    assert done.choices[0].text == expect("hi", "a", 3)


async def test_sglang_routes_keep_their_contract(live: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        body = {"lora_name": "x", "lora_path": "/no/such/folder"}
        async with session.post(f"{live.url}/load_lora_adapter", json=body) as resp:
            assert resp.status == 400  # SGLang's status for every admin failure
            answer = await resp.json()
        assert answer["success"] is False
        assert "no adapter found" in answer["error_message"]
        assert answer["loaded_adapters"] == {"a": "/ad/a", "b": "/ad/b"}
