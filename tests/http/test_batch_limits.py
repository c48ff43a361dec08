"""A call of more requests than the server ever holds in flight can never run: a 413 naming the
limit (not a 503 to retry); a batch that fits runs."""

from __future__ import annotations

from tests.http.conftest import MakeClient
from tests.http.real_server import BASE


async def test_a_batch_that_can_never_fit_is_a_413(make_client: MakeClient) -> None:
    client = await make_client(max_running_requests=2, max_queued_requests=4)  # 6 in flight
    params = {"max_new_tokens": 2}
    resp = await client.post("/generate", json={"text": ["hi"] * 7, "sampling_params": params})
    body = await resp.json()
    assert resp.status == 413, body
    assert body["error"]["type"] == "batch_too_large"
    assert "at most 6 can be in flight" in body["error"]["message"]
    assert "--max-queued-requests 4" in body["error"]["message"]
    resp = await client.post("/generate", json={"text": ["hi"] * 6, "sampling_params": params})
    assert resp.status == 200, await resp.text()
    assert len(await resp.json()) == 6
    # OpenAI: prompts x n choices count alike
    body = {"model": BASE, "prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 2}
    resp = await client.post("/v1/completions", json=body)
    error = (await resp.json())["error"]
    assert resp.status == 413
    assert (error["type"], error["code"]) == ("invalid_request_error", "batch_too_large")
