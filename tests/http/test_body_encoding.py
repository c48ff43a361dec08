"""Content-Encoding on every JSON route, served as `serve` runs the app: gzip and deflate bodies
work; corrupt, truncated or unsupported (brotli, zstd) ones are a 400 in the route's own error
shape, with no traceback in the log; a small body that inflates past the limit is a 413."""

from __future__ import annotations

import gzip
import logging
import zlib
from typing import Any

import aiohttp
import msgspec
import pytest

from tests.http.conftest import Client
from tests.http.real_server import BASE, real_server

ROUTES: dict[str, dict[str, Any]] = {
    "/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 2}},
    "/abort_request": {"rid": "nobody"},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [104, 105]},
    "/load_lora_adapter": {"lora_name": "c", "lora_path": "/ad/c"},
    "/unload_lora_adapter": {"lora_name": "c"},
    "/v1/load_lora_adapter": {"lora_name": "c", "lora_path": "/ad/c"},
    "/v1/unload_lora_adapter": {"lora_name": "c"},
    "/v1/completions": {"model": BASE, "prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {
        "model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2
    },
}  # fmt: skip
BAD_BODIES = [
    ("gzip", b"\x00garbage, not gzip", "corrupt gzip"),
    ("gzip", gzip.compress(b'{"text": "hi"}')[:-12], "truncated gzip"),
    ("deflate", b"zzz", "deflate data"),
    ("br", b"\x1b\x03\x00", "'br' is not supported"),
    ("zstd", b"(\xb5/\xfd", "'zstd' is not supported"),
    ("gzip, snappy", b"x", "'snappy' is not supported"),
]


def assert_route_shape(path: str, body: dict[str, Any], needle: str) -> None:
    if path in ("/load_lora_adapter", "/unload_lora_adapter"):  # SGLang's admin shape
        assert body["success"] is False
        assert needle in body["error_message"], body
        return
    error = body["error"]
    assert needle in error["message"], body
    if path.startswith("/v1/"):  # OpenAI's shape, as the openai client reads it
        assert error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
    else:
        assert (error["type"], error["code"]) == ("invalid_request", 400)


@pytest.mark.parametrize(("coding", "data", "needle"), BAD_BODIES)
async def test_bad_encodings_are_a_400_on_every_route(
    coding: str, data: bytes, needle: str, caplog: pytest.LogCaptureFixture
) -> None:
    headers = {"Content-Encoding": coding, "Content-Type": "application/json"}
    async with real_server(api_key=None) as server, aiohttp.ClientSession() as session:
        for path in ROUTES:
            async with session.post(server.url + path, data=data, headers=headers) as resp:
                assert resp.status == 400, (path, await resp.text())
                assert resp.content_type == "application/json"
                assert_route_shape(path, await resp.json(), needle)
        async with session.get(server.url + "/health") as resp:
            assert resp.status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_gzip_and_deflate_bodies_work() -> None:
    payload = msgspec.json.encode(ROUTES["/v1/completions"])
    bodies = {
        "gzip": gzip.compress(payload),
        "deflate": zlib.compress(payload),
        "identity": payload,
        "gzip, gzip": gzip.compress(gzip.compress(payload)),
    }
    async with real_server(api_key=None) as server, aiohttp.ClientSession() as session:
        for coding, data in bodies.items():
            headers = {"Content-Encoding": coding, "Content-Type": "application/json"}
            url = server.url + "/v1/completions"
            async with session.post(url, data=data, headers=headers) as resp:
                assert resp.status == 200, (coding, await resp.text())
                assert (await resp.json())["usage"]["completion_tokens"] == 2


async def test_a_gzip_bomb_is_a_413() -> None:
    bomb = gzip.compress(b" " * (40 << 20))  # ~40 KB that inflate to 40 MB (the limit is 32)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with real_server(api_key=None) as server, aiohttp.ClientSession() as session:
        resp = await session.post(server.url + "/generate", data=bomb, headers=headers)
        assert resp.status == 413
        assert (await resp.json())["error"]["type"] == "request_too_large"


async def test_apps_served_with_aiohttp_decompression_answer_400_too(client: Client) -> None:
    # An embedding app run by another runner: aiohttp inflates, and its failure is mapped.
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    resp = await client.post("/v1/completions", data=b"\x00not gzip", headers=headers)
    assert resp.status == 400
    assert_route_shape("/v1/completions", await resp.json(), "cannot decode Content-Encoding")
