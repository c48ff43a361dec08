"""Happy paths and response shapes of every route, over a FakeEngine."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from lorasrv.http.app import build_app
from tests.http.conftest import MakeClient
from tests.http.fake_engine import DEMO_ADAPTERS, FakeEngine

Client = TestClient[web.Request, web.Application]


async def test_generate_single_text(client: Client, engine: FakeEngine) -> None:
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    resp = await client.post("/generate", json=body)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    out = await resp.json()
    assert out["text"] == " base0 base1 base2"
    assert len(out["output_ids"]) == 3
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == 2
    assert meta["completion_tokens"] == 3
    assert meta["finish_reason"] == {"type": "length", "length": 3}
    assert set(meta) >= {"id", "cached_tokens", "e2e_latency"}
    assert engine.calls == [
        (
            "generate",
            {
                "text": "hi",
                "input_ids": None,
                "sampling_params": {"max_new_tokens": 3, "temperature": 0},
                "lora_path": None,
                "rid": None,
            },
        )
    ]


async def test_generate_batch_with_per_item_lora_path(client: Client, engine: FakeEngine) -> None:
    body = {
        "text": ["one", "two", "three"],
        "sampling_params": {"max_new_tokens": 2},
        "lora_path": ["demo-lora-a", "demo-lora-b", None],
        "rid": ["r1", "r2", "r3"],
    }
    resp = await client.post("/generate", json=body)
    assert resp.status == 200
    out = await resp.json()
    assert [item["text"] for item in out] == [
        " demo-lora-a0 demo-lora-a1",
        " demo-lora-b0 demo-lora-b1",
        " base0 base1",
    ]
    assert [item["meta_info"]["id"] for item in out] == ["r1", "r2", "r3"]
    assert engine.calls[0][1]["lora_path"] == ["demo-lora-a", "demo-lora-b", None]


@pytest.mark.parametrize(
    ("input_ids", "is_batch"), [([1, 2, 3], False), ([[1, 2], [3], [4, 5, 6]], True)]
)
async def test_generate_input_ids(
    client: Client, engine: FakeEngine, input_ids: list[Any], is_batch: bool
) -> None:
    body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 1}}
    resp = await client.post("/generate", json=body)
    assert resp.status == 200
    out = await resp.json()
    assert isinstance(out, list) is is_batch
    assert engine.calls[0][1]["input_ids"] == input_ids


async def test_return_logprob_maps_into_sampling_params(client: Client, engine: FakeEngine) -> None:
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}, "return_logprob": True}
    body["top_logprobs_num"] = 3
    resp = await client.post("/generate", json=body)
    assert resp.status == 200
    assert len((await resp.json())["meta_info"]["output_token_logprobs"]) == 2
    params = engine.calls[0][1]["sampling_params"]
    assert params == {"max_new_tokens": 2, "logprobs": True, "top_logprobs": 3}


async def test_per_item_return_logprob_expands_sampling_params(
    client: Client, engine: FakeEngine
) -> None:
    body: dict[str, Any] = {"text": ["a", "b"], "sampling_params": {"max_new_tokens": 1}}
    body["return_logprob"] = [True, False]
    resp = await client.post("/generate", json=body)
    assert resp.status == 200
    assert engine.calls[0][1]["sampling_params"] == [
        {"max_new_tokens": 1, "logprobs": True, "top_logprobs": 0},
        {"max_new_tokens": 1},
    ]


@pytest.mark.parametrize("prefix", ["", "/v1"])
async def test_load_and_unload_adapter(client: Client, engine: FakeEngine, prefix: str) -> None:
    resp = await client.post(
        f"{prefix}/load_lora_adapter", json={"lora_name": "new", "lora_path": "/ad/new"}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body == {
        "success": True,
        "error_message": "",
        "loaded_adapters": {**DEMO_ADAPTERS, "new": "/ad/new"},
    }
    assert engine.calls[-1] == (
        "load_adapter",
        {"lora_name": "new", "lora_path": "/ad/new", "pinned": False},
    )
    resp = await client.post(f"{prefix}/unload_lora_adapter", json={"lora_name": "new"})
    assert resp.status == 200
    assert (await resp.json())["loaded_adapters"] == DEMO_ADAPTERS


@pytest.mark.parametrize("prefix", ["", "/v1"])
async def test_adapter_failures_answer_400_in_the_same_shape(client: Client, prefix: str) -> None:
    resp = await client.post(
        f"{prefix}/load_lora_adapter", json={"lora_name": "demo-lora-a", "lora_path": "/x"}
    )
    assert resp.status == 400
    body = await resp.json()
    assert body["success"] is False
    assert "already loaded" in body["error_message"]
    assert body["loaded_adapters"] == DEMO_ADAPTERS
    resp = await client.post(f"{prefix}/unload_lora_adapter", json={"lora_name": "nope"})
    assert resp.status == 400
    assert "'nope' is not loaded" in (await resp.json())["error_message"]


async def test_load_adapter_pinned_is_passed(client: Client, engine: FakeEngine) -> None:
    body = {"lora_name": "p", "lora_path": "/ad/p", "pinned": True}
    resp = await client.post("/load_lora_adapter", json=body)
    assert resp.status == 200
    assert engine.calls[-1][1]["pinned"] is True


async def test_v1_models_lists_base_then_adapters(make_client: MakeClient) -> None:
    client = await make_client(model_path="/models/tiny", served_model_name="tiny")
    resp = await client.get("/v1/models")
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    base, *adapters = body["data"]
    assert base["id"] == "tiny"
    assert base["object"] == "model"
    assert base["owned_by"] == "lorasrv"
    assert base["root"] == "/models/tiny"
    assert base["parent"] is None
    assert isinstance(base["created"], int)
    assert [(a["id"], a["root"], a["parent"]) for a in adapters] == [
        (name, path, "tiny") for name, path in DEMO_ADAPTERS.items()
    ]


async def test_health(client: Client, engine: FakeEngine) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    engine.healthy = False
    resp = await client.get("/health")
    assert resp.status == 503
    assert (await resp.json())["error"]["type"] == "engine_dead"


async def test_health_generate(client: Client, engine: FakeEngine) -> None:
    resp = await client.get("/health_generate")
    assert resp.status == 200
    assert engine.calls[-1][1]["sampling_params"] == {"max_new_tokens": 1}


async def test_model_and_server_info(client: Client) -> None:
    resp = await client.get("/get_model_info")
    assert resp.status == 200
    assert (await resp.json())["is_generation"] is True
    resp = await client.get("/get_server_info")
    assert resp.status == 200
    info = await resp.json()
    assert info["config"]["adapters"]["max_loras_per_batch"] is None  # memory bounds it
    assert [a["name"] for a in info["adapters"]] == list(DEMO_ADAPTERS)


async def test_app_owns_engine_lifetime_only_when_told(aiohttp_client: Any) -> None:
    owned, borrowed = FakeEngine(), FakeEngine()
    client = await aiohttp_client(build_app(owned.config, owned))
    assert owned.is_started
    await client.close()
    assert owned.is_stopped
    client = await aiohttp_client(build_app(borrowed.config, borrowed, manage_engine=False))
    await client.close()
    assert not borrowed.is_started
    assert not borrowed.is_stopped
