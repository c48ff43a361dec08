"""Error statuses and bodies: each failure is JSON naming the problem; the app keeps serving.
Over the real engine, so every message is the one a client gets."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from lorasrv.engine.engine import Engine
from tests.http.conftest import MakeClient

Client = TestClient[web.Request, web.Application]


async def error_of(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["code"] == status
    error: dict[str, Any] = body["error"]
    return error


async def assert_still_serving(client: Client) -> None:
    resp = await client.post("/generate", json={"text": "ok", "sampling_params": {}})
    assert resp.status == 200


@pytest.mark.parametrize(
    ("body", "status", "error_type", "needle"),
    [
        (b'{"text": "hi",', 400, "invalid_request", "invalid JSON"),
        (b"", 400, "invalid_request", "invalid JSON: empty request body"),
        (b'["text"]', 400, "invalid_request", "Expected `object`"),
        (b'{"text": 5}', 400, "invalid_request", "$.text"),
        (b'{"text": "a", "sampling_params": "x"}', 400, "invalid_request", "$.sampling_params"),
        (b'{"text": "a", "foo": 1}', 400, "invalid_request", "unknown field `foo`"),
        (b'{"text": "a", "image_data": "x"}', 400, "invalid_request", "`image_data`"),
        (b'{"text": "a", "stream": "yes"}', 400, "invalid_request", "$.stream"),
        (b'{"text": ""}', 400, "invalid_request", "the prompt is empty"),
        (b"{}", 400, "invalid_request", "text or input_ids"),
        (b'{"input_ids": [1, [2]]}', 400, "invalid_request", "not a mix"),
        (b'{"text": "a", "logprob_start_len": 0}', 400, "invalid_request", "logprob_start_len"),
        (
            b'{"text": "a", "sampling_params": {"max_new_tokens": -1}}',
            400,
            "invalid_request",
            "max_new_tokens must be >= 1, got -1",
        ),
        (
            b'{"text": "a", "sampling_params": {"max_new_tokens": "ten"}}',
            400,
            "invalid_request",
            "$.sampling_params.max_new_tokens",
        ),
        (
            b'{"text": "a", "sampling_params": {"temprature": 0}}',
            400,
            "invalid_request",
            "temprature",
        ),
        (
            b'{"text": ["a", "b"], "lora_path": ["a"]}',
            400,
            "invalid_request",
            "lora_path has 1 entries for 2 prompt(s)",
        ),
        (
            b'{"text": ["a", "b"], "sampling_params": [{}, {}, {}]}',
            400,
            "invalid_request",
            "sampling_params has 3 entries for 2 prompt(s)",
        ),
        (b'{"text": "a", "sampling_params": {"n": 0}}', 400, "invalid_request", "n must be in"),
        (b'{"text": "a", "rid": ["x", "y"]}', 400, "invalid_request", "rid has 2 entries"),
        (b'{"text": "a", "lora_path": "nope"}', 404, "adapter_not_found", "'nope' is not loaded"),
        (b'{"text": "' + b"x" * 300 + b'"}', 413, "prompt_too_long", "300 tokens"),
    ],
)
async def test_bad_generate_requests(
    client: Client, body: bytes, status: int, error_type: str, needle: str
) -> None:
    resp = await client.post("/generate", data=body)
    error = await error_of(resp, status)
    assert error["type"] == error_type
    assert needle in error["message"]
    await assert_still_serving(client)


async def test_unknown_route_and_wrong_method(client: Client) -> None:
    error = await error_of(await client.get("/nope"), 404)
    assert error == {"message": "no route /nope", "type": "not_found", "code": 404}
    resp = await client.get("/generate")
    error = await error_of(resp, 405)
    assert error["type"] == "method_not_allowed"
    assert error["message"] == "GET is not allowed on /generate (allowed: POST)"
    assert resp.headers["Allow"] == "POST"
    await assert_still_serving(client)


async def test_body_too_large(make_client: MakeClient) -> None:
    client = await make_client(client_max_size=1024)
    resp = await client.post("/generate", json={"text": "x" * 2000})
    error = await error_of(resp, 413)
    assert error["type"] == "request_too_large"
    assert "1024" in error["message"]
    await assert_still_serving(client)


async def test_unexpected_exception_is_a_500_without_traceback(
    client: Client, engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(engine, "submit", broken)
    with caplog.at_level(logging.ERROR, logger="lorasrv.http"):
        resp = await client.post("/generate", json={"text": "a"})
    error = await error_of(resp, 500)
    assert error == {"message": "internal server error", "type": "internal_error", "code": 500}
    assert "secret internals" not in await resp.text()
    assert any(record.exc_info for record in caplog.records)
    monkeypatch.undo()
    await assert_still_serving(client)


@pytest.mark.parametrize(
    ("route", "body", "needle"),
    [
        ("/load_lora_adapter", b"{", "invalid JSON"),
        ("/load_lora_adapter", b'{"lora_name": "x"}', "missing required field `lora_path`"),
        ("/load_lora_adapter", b'{"lora_name": "x", "lora_path": 3}', "$.lora_path"),
        ("/unload_lora_adapter", b'{"lora_name": "x", "extra": 1}', "unknown field `extra`"),
        (
            "/load_lora_adapter",
            b'{"lora_name": "x", "lora_path": "/no/x"}',
            "not an adapter folder",
        ),
    ],
)
async def test_bad_adapter_requests_keep_the_adapter_shape(
    client: Client, route: str, body: bytes, needle: str
) -> None:
    resp = await client.post(route, data=body)
    assert resp.status == 400
    answer = await resp.json()
    assert answer["success"] is False
    assert needle in answer["error_message"]
    assert "a" in answer["loaded_adapters"]
    await assert_still_serving(client)


@pytest.mark.parametrize(
    ("generate", "completion"),
    [
        ({"text": ""}, {"prompt": ""}),
        ({"input_ids": []}, {"prompt": [[]]}),
        ({"text": "a", "sampling_params": {"temperature": -1}}, {"prompt": "a", "temperature": -1}),
        ({"text": "a", "sampling_params": {"top_p": 0}}, {"prompt": "a", "top_p": 0}),
        ({"text": "a", "sampling_params": {"presence_penalty": 3}},
         {"prompt": "a", "presence_penalty": 3}),
        ({"input_ids": [1, 500]}, {"prompt": [1, 500]}),
    ],
)  # fmt: skip
async def test_a_bad_value_gets_one_message_whatever_the_route(
    client: Client, generate: dict[str, Any], completion: dict[str, Any]
) -> None:
    """Checked once, by the engine: /generate and /v1/completions say the same thing."""
    sglang = await error_of(await client.post("/generate", json=generate), 400)
    resp = await client.post("/v1/completions", json={"model": "fake-base", **completion})
    assert resp.status == 400
    openai = (await resp.json())["error"]
    assert sglang["message"] == openai["message"]
    assert openai["type"] == "invalid_request_error"
