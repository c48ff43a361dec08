"""Happy paths and response shapes of the SGLang-side routes, over the real engine (FakeRunner):
answers are exact, and what reached the runner (prompt, sampling params) is checked too."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from lorasrv.engine.engine import Engine
from lorasrv.http.app import build_app
from tests.actors.test_engine import SALTS
from tests.fakes import FakeRunner, fake_generate
from tests.http.conftest import Client, MakeClient
from tests.http.real_server import (
    ADAPTERS,
    BASE,
    CONTEXT_LENGTH,
    expect,
    fake_engine,
    server_config,
    wait_until,
)

GREEDY = {"max_new_tokens": 3, "temperature": 0}


async def ok_json(resp: Any) -> Any:
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_generate_single_text(client: Client, runner: FakeRunner) -> None:
    body = {"text": "hi", "sampling_params": GREEDY}
    out = await ok_json(await client.post("/generate", json=body))
    assert out["text"] == expect("hi", None, 3)
    assert out["output_ids"] == [ord(c) for c in out["text"]]
    meta = out["meta_info"]
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (2, 3)
    assert meta["finish_reason"] == {"type": "length", "length": 3}
    assert set(meta) == {"id", "prompt_tokens", "completion_tokens", "cached_tokens",
                         "finish_reason", "e2e_latency"}  # fmt: skip
    (seq,) = runner.new_seqs()
    assert seq.prompt_ids == (ord("h"), ord("i"))
    assert (seq.params.max_new_tokens, seq.params.temperature) == (3, 0)


async def test_generate_batch_with_per_item_lora_path(client: Client) -> None:
    body = {
        "text": ["one", "two", "three"],
        "sampling_params": GREEDY,
        "lora_path": ["a", "b", None],
        "rid": ["r1", "r2", "r3"],
    }
    out = await ok_json(await client.post("/generate", json=body))
    assert [item["text"] for item in out] == [
        expect("one", "a", 3),
        expect("two", "b", 3),
        expect("three", None, 3),
    ]
    assert [item["meta_info"]["id"] for item in out] == ["r1", "r2", "r3"]
    assert all("index" not in item for item in out)


@pytest.mark.parametrize(
    ("input_ids", "is_batch"), [([65, 66, 67], False), ([[65, 66], [67], [68, 69, 70]], True)]
)
async def test_generate_input_ids(
    client: Client, runner: FakeRunner, input_ids: list[Any], is_batch: bool
) -> None:
    body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 1}}
    out = await ok_json(await client.post("/generate", json=body))
    assert isinstance(out, list) is is_batch
    rows = input_ids if is_batch else [input_ids]
    assert sorted(seq.prompt_ids for seq in runner.new_seqs()) == sorted(map(tuple, rows))


async def test_return_logprob_maps_into_sampling_params(client: Client, runner: FakeRunner) -> None:
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}, "return_logprob": True,
            "top_logprobs_num": 3}  # fmt: skip
    out = await ok_json(await client.post("/generate", json=body))
    tokens = out["output_ids"]
    # FakeRunner: logprob -0.5 for every token, and the sampled token as the only alternative
    assert out["meta_info"]["output_token_logprobs"] == [[-0.5, t, [[-0.5, t]]] for t in tokens]
    (seq,) = runner.new_seqs()
    assert (seq.params.logprobs, seq.params.top_logprobs) == (True, 3)


async def test_per_item_return_logprob(client: Client, runner: FakeRunner) -> None:
    body: dict[str, Any] = {"text": ["a", "b"], "sampling_params": {"max_new_tokens": 1},
                            "return_logprob": [True, False]}  # fmt: skip
    first, second = await ok_json(await client.post("/generate", json=body))
    assert "output_token_logprobs" in first["meta_info"]
    assert "output_token_logprobs" not in second["meta_info"]
    by_prompt = {seq.prompt_ids: seq.params for seq in runner.new_seqs()}
    assert by_prompt[(ord("a"),)].logprobs is True
    assert by_prompt[(ord("b"),)].logprobs is False


async def test_sglang_sampling_fields_reach_the_runner(client: Client, runner: FakeRunner) -> None:
    sampling = {"max_new_tokens": 4, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
                "stop": "zz", "stop_token_ids": [3], "ignore_eos": True, "sampling_seed": 7,
                "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": -0.5,
                "skip_special_tokens": False}  # fmt: skip
    await ok_json(await client.post("/generate", json={"text": "x", "sampling_params": sampling}))
    (seq,) = runner.new_seqs()
    params = seq.params
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.5, 0.9, 5, 0.1)
    assert (params.stop, params.stop_token_ids, params.ignore_eos) == (("zz",), (3,), True)
    assert (params.seed, params.repetition_penalty) == (7, 1.1)
    assert (params.frequency_penalty, params.presence_penalty) == (0.5, -0.5)
    assert params.skip_special_tokens is False


async def test_load_and_unload_adapter(client: Client) -> None:
    load = {"lora_name": "new", "lora_path": "/ad/c"}
    body = await ok_json(await client.post("/load_lora_adapter", json=load))
    assert body == {"success": True, "error_message": "",
                    "loaded_adapters": {**ADAPTERS, "new": "/ad/c"}}  # fmt: skip
    body = {"text": "q", "lora_path": "new", "sampling_params": GREEDY}
    out = await ok_json(await client.post("/generate", json=body))
    assert out["text"] == "".join(chr(t) for t in fake_generate([ord("q")], SALTS["/ad/c"], 3))
    resp = await client.post("/unload_lora_adapter", json={"lora_name": "new"})
    assert (await ok_json(resp))["loaded_adapters"] == ADAPTERS


@pytest.mark.parametrize(
    ("route", "body", "needle"),
    [
        ("/load_lora_adapter", {"lora_name": "a", "lora_path": "/ad/c"}, "already been loaded"),
        ("/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"}, "no adapter found"),
        ("/load_lora_adapter", {"lora_name": "", "lora_path": "/ad/c"}, "must not be empty"),
        ("/unload_lora_adapter", {"lora_name": "nope"}, "'nope' cannot be found"),
    ],
)
async def test_adapter_failures_answer_400_in_the_same_shape(
    client: Client, route: str, body: dict[str, Any], needle: str
) -> None:
    resp = await client.post(route, json=body)
    assert resp.status == 400  # SGLang's contract: every admin failure is a 400
    answer = await resp.json()
    assert answer["success"] is False
    assert needle in answer["error_message"]
    assert answer["loaded_adapters"] == ADAPTERS


async def test_load_adapter_pinned_is_passed(client: Client, engine: Engine) -> None:
    body = {"lora_name": "p", "lora_path": "/ad/c", "pinned": True}
    await ok_json(await client.post("/load_lora_adapter", json=body))
    (status,) = [s for s in await engine.describe_adapters() if s.name == "p"]
    assert status.pinned
    assert status.state == "pinned"


async def test_v1_models_lists_base_then_adapters(make_client: MakeClient) -> None:
    client = await make_client(served_model_name="tiny")
    body = await ok_json(await client.get("/v1/models"))
    assert body["object"] == "list"
    base, *adapters = body["data"]
    assert (base["id"], base["object"], base["owned_by"]) == ("tiny", "model", "lorasrv")
    assert (base["root"], base["parent"]) == ("/fake/model", None)
    assert isinstance(base["created"], int)
    assert [(a["id"], a["root"], a["parent"]) for a in adapters] == [
        (name, path, "tiny") for name, path in ADAPTERS.items()
    ]


async def test_health_follows_the_engine(
    client: Client, engine: Engine, runner: FakeRunner
) -> None:
    assert (await client.get("/health")).status == 200
    runner.fail_at_step = runner.num_steps_started + 1  # the next step crashes the engine
    resp = await client.post("/generate", json={"text": "x"})
    assert resp.status == 503
    await wait_until(lambda: not engine.is_healthy(), "the engine is marked dead")
    resp = await client.get("/health")
    assert resp.status == 503
    assert (await resp.json())["error"]["type"] == "engine_dead"


async def test_health_generate_runs_one_token(client: Client, runner: FakeRunner) -> None:
    assert (await client.get("/health_generate")).status == 200
    (seq,) = runner.new_seqs()
    assert (seq.prompt_ids, seq.params.max_new_tokens) == ((0,), 1)


async def test_model_and_server_info(client: Client) -> None:
    info = await ok_json(await client.get("/get_model_info"))
    assert info["is_generation"] is True
    assert (info["served_model_name"], info["model_path"]) == (BASE, "/fake/model")
    assert (info["context_length"], info["vocab_size"]) == (CONTEXT_LENGTH, 128)
    server = await ok_json(await client.get("/get_server_info"))
    assert server["config"]["adapters"]["max_loras_per_batch"] == 2
    assert [a["name"] for a in server["adapters"]] == list(ADAPTERS)
    assert server["scheduler"]["num_running"] == 0
    assert server["healthy"] is True


async def test_app_owns_engine_lifetime_only_when_told(aiohttp_client: Any) -> None:
    config = server_config()
    owned, borrowed = fake_engine(config), fake_engine(config)
    client: TestClient[Any, Any] = await aiohttp_client(build_app(config, owned))
    assert owned.is_healthy()
    await client.close()
    assert not owned.is_healthy()
    assert owned.failure == "engine stopped"
    client = await aiohttp_client(build_app(config, borrowed, manage_engine=False))
    await client.close()
    assert not borrowed.is_healthy()
    assert borrowed.failure is None  # never started, never stopped
