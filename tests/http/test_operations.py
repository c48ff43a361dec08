"""Operator surface: the periodic stats log line, /version, /server_info, bound sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

import pytest

import lorasrv
from lorasrv.engine.engine import Engine
from lorasrv.engine.requests import Submission
from lorasrv.engine.stats import SchedulerStats
from lorasrv.http.app import serve_async
from lorasrv.http.listen import bind_sockets
from lorasrv.http.stats_log import Sample, format_line, is_idle, log_stats
from lorasrv.ids import AdapterId, SlotId
from lorasrv.messages import AdapterStatus, SamplingParams
from tests.http.conftest import MakeClient
from tests.http.real_server import fake_engine, real_server, server_config
from tests.http.test_serve import wait_until_serving

STATS = SchedulerStats(num_running=3, num_waiting=1, num_acquiring=1, num_kv_pages=160,
                       num_kv_pages_used=20)  # fmt: skip


def status(name: str, slot: int | None, evictions: int) -> AdapterStatus:
    return AdapterStatus(
        name=name, path=f"/ad/{name}", adapter_id=AdapterId(1), state="cpu_loaded",
        slot=None if slot is None else SlotId(slot), rank=8, pinned=False, num_refs=0,
        num_evictions=evictions,
    )  # fmt: skip


def test_format_line() -> None:
    adapters = (status("a", 0, 2), status("b", None, 1), status("c", 1, 0))
    before = Sample(at_s=100.0, prompt_tokens=50, generation_tokens=200, evictions=1)
    now = Sample(at_s=110.0, prompt_tokens=1050, generation_tokens=4200, evictions=3)
    assert format_line(before, now, STATS, adapters) == (
        "running: 3 reqs, waiting: 2 reqs, prompt: 100.0 tok/s, generation: 400.0 tok/s, "
        "KV cache: 12.5% (20/160 pages), adapters: 2 resident / 3 registered, adapter swaps: 2"
    )


def test_idle_means_nothing_queued_and_no_new_tokens() -> None:
    same = Sample(at_s=1.0, prompt_tokens=5, generation_tokens=7, evictions=0)
    later = same._replace(at_s=11.0)
    assert is_idle(same, later, SchedulerStats())
    assert not is_idle(same, later._replace(generation_tokens=8), SchedulerStats())
    assert not is_idle(same, later, SchedulerStats(num_waiting=1))


async def test_stats_lines_while_serving_real_engine(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lorasrv.stats")
    async with real_server() as server:
        task = asyncio.create_task(log_stats(server.engine, 0.2))
        try:
            params = SamplingParams(max_new_tokens=8, ignore_eos=True)
            submission = Submission(text="hello", lora_name="a", params=params)
            await server.engine.submit(submission).result()
            async with asyncio.timeout(5):
                while not any("generation" in r.message for r in caplog.records):
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
    line = next(r.message for r in caplog.records if r.name == "lorasrv.stats")
    assert line.startswith("running: ")
    assert "generation: 0.0 tok/s" not in line  # the 8 tokens fell into the first interval
    assert "/ 2 registered" in line


async def test_idle_lines_are_not_repeated(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lorasrv.stats")
    engine = fake_engine(server_config())  # not started: no adapters, no requests
    task = asyncio.create_task(log_stats(engine, 0.01))
    await asyncio.sleep(0.2)  # ~20 idle intervals
    task.cancel()
    assert len([r for r in caplog.records if r.name == "lorasrv.stats"]) == 1


async def serve_until_sigterm(task: asyncio.Task[int], engine: Engine) -> None:
    await wait_until_serving(task, engine.is_healthy)
    await asyncio.sleep(0.3)
    os.kill(os.getpid(), signal.SIGTERM)
    async with asyncio.timeout(5):
        assert await task == 0


@pytest.mark.parametrize(("interval", "expect_lines"), [(0.05, True), (0.0, False)])
async def test_serve_logs_stats_unless_turned_off(
    interval: float, expect_lines: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lorasrv.stats")
    config = server_config(log_stats_interval=interval)
    engine = fake_engine(config)
    task = asyncio.create_task(serve_async(config, engine, bind_sockets("127.0.0.1", 0)))
    await serve_until_sigterm(task, engine)
    lines = [r for r in caplog.records if r.name == "lorasrv.stats"]
    assert bool(lines) is expect_lines


async def test_serves_on_the_sockets_bound_before_start() -> None:
    config = server_config(log_stats_interval=0)
    engine = fake_engine(config)
    sockets = bind_sockets("127.0.0.1", 0)
    port = sockets[0].getsockname()[1]
    task = asyncio.create_task(serve_async(config, engine, sockets))
    await wait_until_serving(task, engine.is_healthy)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /version HTTP/1.0\r\n\r\n")
    reply = await reader.read()
    writer.close()
    assert b"200 OK" in reply
    assert lorasrv.__version__.encode() in reply
    with pytest.raises(OSError, match="in use"), socket.create_server(("127.0.0.1", port)):
        pass  # still ours
    await serve_until_sigterm(task, engine)


async def test_version_and_server_info_alias(make_client: MakeClient) -> None:
    client = await make_client(api_key=None)
    resp = await client.get("/version")
    assert resp.status == 200
    assert await resp.json() == {"version": lorasrv.__version__}
    old, new = await client.get("/get_server_info"), await client.get("/server_info")
    assert new.status == 200
    old_info, new_info = await old.json(), await new.json()
    for info in (old_info, new_info):
        info.pop("scheduler", None)  # live values
        info.pop("uptime_s", None)
    assert new_info == old_info
