"""The access log never holds an API key: a key sent in the URL is refused and redacted."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from aiohttp import web

from lorasrv.http.app import build_app, make_runner
from tests.http.real_server import KEY, fake_engine, server_config


async def test_keys_in_the_url_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    config = server_config(api_key=KEY)
    runner = make_runner(build_app(config, fake_engine(config)))  # serve's access log
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        caplog.set_level(logging.INFO, logger="aiohttp.access")
        async with aiohttp.ClientSession() as session:
            for target in (
                f"/v1/models?api_key={KEY}&x=1",
                f"/v1/models/{KEY}",
                f"/metrics?k={KEY}",
            ):
                async with session.get(url + target) as resp:
                    assert resp.status == 401  # a key in the URL is never accepted
            headers = {"Authorization": f"Bearer {KEY}"}
            async with session.get(f"{url}/health?token=abc", headers=headers) as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert len(lines) == 4, lines
    assert not [line for line in lines if KEY in line or "abc" in line], lines
    assert '"GET /v1/models?api_key=<redacted>&x=<redacted> HTTP/1.1" 401' in lines[0]
    assert "/v1/models/<redacted>" in lines[1]
    assert '"GET /health?token=<redacted> HTTP/1.1" 200' in lines[3]
