"""API keys: Bearer on every route but /health; the admin key guards adapter load/unload.
Over the real engine (FakeRunner)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.http.conftest import MakeClient

KEY, ADMIN = "user-secret-1", "admin-secret-2"
LOAD = ("/load_lora_adapter", {"lora_name": "x", "lora_path": "/ad/c"})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def assert_401(resp: Any) -> None:
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    body = await resp.json()
    if resp.url.path.startswith("/v1/"):  # OpenAI's dialect: its type, our code
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "unauthorized"
    else:
        assert body["error"]["type"] == "unauthorized"
        assert body["error"]["code"] == 401


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong"), {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer "}],
)
async def test_api_key_required(make_client: MakeClient, headers: dict[str, str]) -> None:
    client = await make_client(api_key=KEY)
    await assert_401(await client.post("/generate", json={"text": "a"}, headers=headers))
    await assert_401(await client.get("/v1/models", headers=headers))
    await assert_401(await client.get("/get_server_info", headers=headers))
    await assert_401(await client.post(LOAD[0], json=LOAD[1], headers=headers))
    await assert_401(await client.get("/nope", headers=headers))
    assert (await client.get("/health", headers=headers)).status == 200


async def test_right_key_passes(make_client: MakeClient) -> None:
    client = await make_client(api_key=KEY)
    resp = await client.post("/generate", json={"text": "a"}, headers=bearer(KEY))
    assert resp.status == 200
    assert (await client.post(LOAD[0], json=LOAD[1], headers=bearer(KEY))).status == 200
    assert (await client.get("/nope", headers=bearer(KEY))).status == 404


async def test_admin_key_guards_adapter_routes(make_client: MakeClient) -> None:
    client = await make_client(api_key=KEY, admin_api_key=ADMIN)
    for route in ("/load_lora_adapter", "/v1/load_lora_adapter"):
        await assert_401(await client.post(route, json=LOAD[1], headers=bearer(KEY)))
    await assert_401(await client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}))
    assert (await client.post(LOAD[0], json=LOAD[1], headers=bearer(ADMIN))).status == 200
    resp = await client.post("/unload_lora_adapter", json={"lora_name": "x"}, headers=bearer(ADMIN))
    assert resp.status == 200
    await assert_401(await client.post("/generate", json={"text": "a"}, headers=bearer(ADMIN)))
    assert (await client.post("/generate", json={"text": "a"}, headers=bearer(KEY))).status == 200


async def test_admin_key_guards_abort_request(make_client: MakeClient) -> None:
    """A tenant with the user key must not abort other tenants' requests by rid or abort_all."""
    client = await make_client(api_key=KEY, admin_api_key=ADMIN)
    for body in ({"rid": "someone-elses"}, {"abort_all": True}):
        await assert_401(await client.post("/abort_request", json=body, headers=bearer(KEY)))
        resp = await client.post("/abort_request", json=body, headers=bearer(ADMIN))
        assert resp.status == 200


async def test_admin_key_alone_leaves_other_routes_open(make_client: MakeClient) -> None:
    client = await make_client(admin_api_key=ADMIN)
    assert (await client.post("/generate", json={"text": "a"})).status == 200
    await assert_401(await client.post(LOAD[0], json=LOAD[1]))
    assert (await client.post(LOAD[0], json=LOAD[1], headers=bearer(ADMIN))).status == 200


async def test_keys_never_leave_the_server(make_client: MakeClient, caplog: Any) -> None:
    client = await make_client(api_key=KEY, admin_api_key=ADMIN)
    with caplog.at_level(logging.DEBUG):
        resp = await client.get("/get_server_info", headers=bearer(KEY))
        await client.get("/v1/models", headers=bearer("wrong-key-3"))
    text = await resp.text()
    assert resp.status == 200
    assert KEY not in text
    assert ADMIN not in text
    assert (await resp.json())["config"]["http"]["api_key"] == "<redacted>"
    assert not [
        r for r in caplog.records if KEY in r.getMessage() or "wrong-key-3" in r.getMessage()
    ]
