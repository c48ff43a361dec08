"""bench/load.py against a tiny fake /generate server; bench/make_random_model.py's tiny output.

Checks SSE parsing, TTFT/ITL bookkeeping, percentiles, failure counting and the checkpoint layout.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 1000
TTFT_S = 0.05
GAP_S = 0.12  # between chunks; the second chunk adds 2 tokens, the others 1
CHUNK_SIZES = (1, 2, 1)  # max_new_tokens 4


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


load = load_script("load")
make_random_model = load_script("make_random_model")


# ----------------------------------------------------------------------------- fake server


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chunk(ids: list[int], prompt_len: int) -> dict[str, Any]:
    meta = {"prompt_tokens": prompt_len, "completion_tokens": len(ids), "finish_reason": None}
    return {"text": "x" * len(ids), "output_ids": list(ids), "meta_info": meta}


async def model_info(request: web.Request) -> web.Response:
    return web.json_response({"vocab_size": VOCAB, "model_path": "fake"})


async def generate(request: web.Request) -> web.StreamResponse:
    """Adapter `bad`: HTTP 400; `err`: one chunk then an error event; `slow`: hangs."""
    body = await request.json()
    request.app[BODIES].append(body)
    adapter = body.get("lora_path")
    assert body["stream"] is True
    assert body["sampling_params"]["ignore_eos"] is True
    if adapter == "bad":
        error = {"message": "bad adapter", "type": "invalid_request", "code": 400}
        return web.json_response({"error": error}, status=400)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    prompt_len = len(body["input_ids"])
    await asyncio.sleep(TTFT_S)
    if adapter == "slow":
        await asyncio.sleep(10)
    ids: list[int] = []
    for i, size in enumerate(CHUNK_SIZES):
        if i:
            await asyncio.sleep(GAP_S)
        ids += [42] * size
        raw = _event(_chunk(ids, prompt_len))
        await response.write(raw[:7])  # split mid-event: the client must reassemble
        await response.write(raw[7:])
        if adapter == "err":
            await response.write(_event({"error": {"message": "boom", "type": "internal"}}))
            return response
    await response.write(b"data: [DONE]\n\n")
    return response


BODIES = web.AppKey("bodies", list)


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    app = web.Application()
    app[BODIES] = []
    app.router.add_get("/get_model_info", model_info)
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", app[BODIES]
    finally:
        await runner.cleanup()


def args_for(url: str, *extra: str) -> Any:
    fixed = ["--num-requests", "8", "--concurrency", "4", "--input-len", "16", "--output-len", "4"]
    return load.parse_args(["--url", url, *fixed, *extra])


# ----------------------------------------------------------------------------- tests


def test_sse_parser_reassembles_split_and_multiline_events() -> None:
    parser = load.SseParser()
    assert parser.feed(b'data: {"a"') == []
    assert parser.feed(b": 1}\r\n\r\n: comment\n\nevent: x\ndata: one\ndata:two\n\nda") == [
        '{"a": 1}',
        "one\ntwo",
    ]
    assert parser.feed(b"ta: [DONE]\n") == []
    assert parser.flush() == ["[DONE]"]


def test_percentile_matches_linear_interpolation() -> None:
    values = [0.4, 0.1, 0.3, 0.2]
    assert load.percentile(values, 50) == pytest.approx(0.25)
    assert load.percentile(values, 90) == pytest.approx(0.37)
    assert load.percentile(values, 99) == pytest.approx(0.397)
    assert load.percentile([5.0], 99) == 5.0
    assert math.isnan(load.percentile([], 50))


def test_compute_metrics_counts_and_throughput() -> None:
    results = [
        load.RequestResult(
            i, None, ok=True, prompt_tokens=10, output_tokens=4, ttft_s=0.1 * (i + 1),
            latency_s=1.0 + i, itl_s=[0.01 * (i + 1)] * 3,
        )
        for i in range(4)
    ]  # fmt: skip
    results.append(load.RequestResult(4, "x", error="HTTP 400: no"))
    metrics = load.compute_metrics(results, wall_s=2.0)
    assert (metrics["requests_ok"], metrics["requests_failed"]) == (4, 1)
    assert metrics["request_throughput"] == pytest.approx(2.0)
    assert metrics["output_token_throughput"] == pytest.approx(8.0)
    assert metrics["total_token_throughput"] == pytest.approx(28.0)
    assert metrics["ttft_p50_ms"] == pytest.approx(250.0)
    assert metrics["ttft_p90_ms"] == pytest.approx(370.0)
    assert metrics["ttft_mean_ms"] == pytest.approx(250.0)
    assert metrics["itl_p50_ms"] == pytest.approx(25.0)
    assert metrics["e2e_p50_ms"] == pytest.approx(2500.0)
    assert metrics["errors"] == {"HTTP 400: no": 1}


def test_prompts_are_seeded_and_in_range() -> None:
    first = load.make_prompts(3, 50, 100, seed=1)
    assert first == load.make_prompts(3, 50, 100, seed=1)
    assert first != load.make_prompts(3, 50, 100, seed=2)
    assert all(len(p) == 50 and all(10 <= i < 90 for i in p) for p in first)
    assert load.parse_adapters("a,none,b,") == ["a", None, "b", None]


async def test_benchmark_measures_streams_and_counts_failures(
    fake_server: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    url, bodies = fake_server
    args = args_for(url, "--adapters", "ok,none,bad,err")
    metrics = await load.benchmark(args)
    assert len(bodies) == 8
    assert [b.get("lora_path") for b in bodies[:4]].count(None) == 1
    assert all(len(b["input_ids"]) == 16 and min(b["input_ids"]) >= 10 for b in bodies)
    assert all(max(b["input_ids"]) < VOCAB - 10 for b in bodies)
    assert (metrics["requests_ok"], metrics["requests_failed"]) == (4, 4)
    assert sum(1 for e in metrics["errors"] if e.startswith("HTTP 400")) == 1
    assert sum(metrics["errors"].values()) == 4
    assert any("boom" in e for e in metrics["errors"])
    assert metrics["output_tokens"] == 16
    assert metrics["prompt_tokens"] == 64
    # TTFT ~ TTFT_S; ITL: the 2-token chunk gives two gaps of GAP_S/2, the last one GAP_S.
    assert TTFT_S * 1e3 <= metrics["ttft_p50_ms"] < TTFT_S * 1e3 + 80
    assert GAP_S / 2 * 1e3 <= metrics["itl_p50_ms"] < GAP_S / 2 * 1e3 + 40
    assert GAP_S * 1e3 <= metrics["itl_p99_ms"] < GAP_S * 1e3 + 80
    assert metrics["itl_mean_ms"] == pytest.approx(2 / 3 * GAP_S * 1e3, rel=0.3)
    report = load.format_report(metrics, args)
    assert "Requests ok / failed:" in report
    assert "4 / 4" in report


async def test_one_request_keeps_per_token_gaps(
    fake_server: tuple[str, list[dict[str, Any]]],
) -> None:
    url, _ = fake_server
    import aiohttp

    spec = load.RequestSpec(0, [11] * 5, None, 4)
    async with aiohttp.ClientSession() as session:
        result = await load.send_request(session, url, spec)
    assert result.ok, result.error
    assert (result.prompt_tokens, result.output_tokens) == (5, 4)
    assert len(result.itl_s) == 3
    assert result.itl_s[0] == result.itl_s[1]
    assert result.itl_s[2] > 1.3 * result.itl_s[0]


async def test_overall_timeout_fails_unfinished_requests(
    fake_server: tuple[str, list[dict[str, Any]]],
) -> None:
    url, _ = fake_server
    args = args_for(url, "--adapters", "ok,slow", "--timeout-s", "1.0")
    loop = asyncio.get_running_loop()
    started = loop.time()
    metrics = await load.benchmark(args)
    assert loop.time() - started < 3.0
    assert (metrics["requests_ok"], metrics["requests_failed"]) == (4, 4)
    assert set(metrics["errors"]) <= {"timed out", "not sent (timed out)"}


def test_main_writes_strict_json_and_reports_unreachable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rc = load.main(["--url", f"http://127.0.0.1:{port}", "--json", str(tmp_path / "x.json")])
    assert rc == 2
    assert not (tmp_path / "x.json").exists()
    report = load.json_safe({"args": {"request_rate": math.inf}, "ttft_p50_ms": math.nan})
    assert json.loads(json.dumps(report, allow_nan=False)) == {
        "args": {"request_rate": "inf"},
        "ttft_p50_ms": None,
    }


# ----------------------------------------------------------------------------- random model


def test_make_random_model_tiny_is_parseable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORASRV_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "model"
    argv = ["--shape", "tiny", "--device", "cpu", "--output", str(out), "--num-adapters", "2"]
    assert make_random_model.main([*argv, "--shard-gb", "0.001"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 1024
    for name in ("generation_config.json", "tokenizer.json", "model.safetensors.index.json"):
        assert (out / name).is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((out / shard).is_file() for shard in shards)
    assert "lm_head.weight" in index["weight_map"]

    from safetensors import safe_open

    arch_module = pytest.importorskip("lorasrv.model.arch")
    arch = arch_module.read_arch(str(out))
    assert (arch.hidden_size, arch.num_layers, arch.num_kv_heads) == (256, 2, 2)

    from lorasrv.peft_config import read_peft_config

    adapters = out.with_name("model-adapters")
    for name in ("a0", "a1"):
        peft = read_peft_config(str(adapters / name))
        assert peft.r == 16
        assert set(peft.target_modules) == set(make_random_model.ALL_MODULES)
        with safe_open(str(adapters / name / "adapter_model.safetensors"), "pt") as f:
            key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
            assert key in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
            b = f.get_tensor(key)
            assert tuple(b.shape) == (256, 16)
            assert b.float().abs().sum() > 0


def test_llama3_8b_shape_plan() -> None:
    shape = make_random_model.SHAPES["llama3-8b"]
    plan = make_random_model.tensor_plan(shape)
    params = sum(math.prod(dims) for _, dims, _ in plan)
    assert params == 8_030_261_248  # Llama-3.1-8B
    shards = make_random_model.plan_shards(plan, 2, 5 * 1000**3)
    assert len(shards) == 4
    assert sum(len(s) for s in shards) == len(plan)
