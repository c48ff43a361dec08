"""The prefix cache at the edge: `meta_info.cached_tokens`, the per-adapter hit and query
counters and the cached-pages gauge in /metrics (labels only for registered adapters),
/flush_cache (SGLang's route, both methods, behind the admin key), and --disable-radix-cache."""

from __future__ import annotations

from typing import Any

from lorasrv.http.state import ENGINE_KEY
from tests.http.conftest import Client, MakeClient
from tests.http.real_server import expect
from tests.http.test_metrics import parse, value

PROMPT = "a system prompt, then the user"  # 30 characters: 7 full pages of 4, then 2 tokens
CACHED = 28


async def generate(client: Client, text: str, lora: str | None = None) -> dict[str, Any]:
    body = {"text": text, "lora_path": lora,
            "sampling_params": {"max_new_tokens": 3, "temperature": 0}}  # fmt: skip
    resp = await client.post("/generate", json=body)
    assert resp.status == 200, await resp.text()
    answer: dict[str, Any] = await resp.json()
    assert answer["text"] == expect(text, lora, 3)
    return answer


async def test_cached_tokens_in_meta_info_and_metrics_per_adapter(client: Client) -> None:
    cached = [(await generate(client, PROMPT, lora))["meta_info"]["cached_tokens"]
              for lora in ("a", "a", None, "b", None)]  # fmt: skip
    assert cached == [0, CACHED, 0, 0, CACHED]
    resp = await client.post("/generate", json={"text": PROMPT, "lora_path": "nope"})
    assert resp.status == 404
    samples = parse(await (await client.get("/metrics")).text())
    hits, queries = (
        "lorasrv_prefix_cache_hit_tokens_total",
        "lorasrv_prefix_cache_query_tokens_total",
    )
    assert value(samples, hits, adapter="a") == CACHED
    assert value(samples, hits, adapter="") == CACHED  # the base model's label
    assert value(samples, hits, adapter="b") == 0
    assert value(samples, queries, adapter="a") == 2 * len(PROMPT)
    assert value(samples, queries, adapter="b") == len(PROMPT)
    labels = {dict(k[1]).get("adapter") for k in samples if k[0] in (hits, queries)}
    assert labels <= {"a", "b", "", "<unknown>"}, "a name no adapter has became a label"
    # "a", base and "b" each cached 8 full pages (30 prompt + 2 fed tokens); nobody holds them
    assert value(samples, "lorasrv_prefix_cache_pages") == 3 * 8
    assert value(samples, "lorasrv_kv_pages_used") == 0


async def test_flush_cache_drops_every_unused_page(make_client: MakeClient) -> None:
    admin, user = "admin-secret", "user-secret"
    client = await make_client(api_key=user, admin_api_key=admin)
    engine = client.app[ENGINE_KEY]
    headers = {"Authorization": f"Bearer {user}"}
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}}
    assert (await client.post("/generate", json=body, headers=headers)).status == 200
    assert (await client.post("/flush_cache", headers=headers)).status == 401
    resp = await client.post("/flush_cache", headers={"Authorization": f"Bearer {admin}"})
    assert resp.status == 200
    assert "7 unused cached pages" in await resp.text()  # 30 + 1 fed tokens
    resp = await client.get("/flush_cache", headers={"Authorization": f"Bearer {admin}"})
    assert resp.status == 200  # SGLang's older method; nothing left to drop
    assert "0 unused cached pages" in await resp.text()
    assert engine.last_stats.num_cached_pages == 0
    again = await client.post("/generate", json=body, headers=headers)
    assert (await again.json())["meta_info"]["cached_tokens"] == 0


async def test_disable_radix_cache_computes_every_prompt(make_client: MakeClient) -> None:
    client = await make_client(disable_radix_cache=True)
    cached = [(await generate(client, PROMPT))["meta_info"]["cached_tokens"] for _ in range(2)]
    assert cached == [0, 0]
    samples = parse(await (await client.get("/metrics")).text())
    assert value(samples, "lorasrv_prefix_cache_query_tokens_total", adapter="") == 0
    assert value(samples, "lorasrv_prefix_cache_pages") == 0
    resp = await client.post("/flush_cache")
    assert resp.status == 200
