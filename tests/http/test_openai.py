"""OpenAI routes over the real engine (FakeRunner), where every answer is exact: shapes and errors
through aiohttp's test client, then the official `openai` package (sync client in a thread, and
AsyncOpenAI) against a live server on loopback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from lorasrv.engine.requests import Submission
from lorasrv.http.state import ENGINE_KEY
from tests.fakes import FakeRunner
from tests.http.conftest import Client, MakeClient, sse_events, sse_json
from tests.http.real_server import (
    BASE,
    CONTEXT_LENGTH,
    KEY,
    Server,
    chat_prompt,
    expect,
    real_server,
    wait_until,
)

TIMEOUT_S = 10


async def ok_json(resp: Any) -> dict[str, Any]:
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def openai_error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# ----------------------------------------------------------------------------- shapes


async def test_completion_shape_and_usage(
    client: Client, runner: FakeRunner, submitted: list[Submission]
) -> None:
    body = {"model": BASE, "prompt": "hello", "max_tokens": 3, "temperature": 0}
    answer = await ok_json(await client.post("/v1/completions", json=body))
    assert answer["object"] == "text_completion"
    assert answer["id"].startswith("cmpl-")
    assert answer["model"] == BASE
    assert answer["choices"] == [
        {"index": 0, "text": expect("hello", None, 3), "logprobs": None, "finish_reason": "length"}
    ]
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                               "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    (seq,) = runner.new_seqs()
    assert (seq.params.max_new_tokens, seq.params.temperature) == (3, 0)
    (submission,) = submitted
    assert submission.lora_name is None
    assert submission.request_id == f"{answer['id']}-0"


@pytest.mark.parametrize(
    ("model", "lora_path", "expected"),
    [
        ("a", None, "a"),
        (f"{BASE}:b", None, "b"),
        (BASE, "b", "b"),  # SGLang's lora_path field
        (BASE, None, None),
    ],
)
async def test_model_selects_base_or_adapter(
    client: Client, model: str, lora_path: str | None, expected: str | None
) -> None:
    body = {"model": model, "prompt": "x", "max_tokens": 2, "lora_path": lora_path,
            "temperature": 0}  # fmt: skip
    answer = await ok_json(await client.post("/v1/completions", json=body))
    assert answer["model"] == model
    assert answer["choices"][0]["text"] == expect("x", expected, 2)


async def test_n_and_prompt_lists_seed_and_usage(
    client: Client, submitted: list[Submission]
) -> None:
    body = {"model": BASE, "prompt": ["ab", "cde"], "n": 2, "max_tokens": 2, "seed": 7}
    answer = await ok_json(await client.post("/v1/completions", json=body))
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert [s.text for s in submitted] == ["ab", "ab", "cde", "cde"]
    assert [s.params.seed for s in submitted] == [7, 8, 7, 8]
    assert len({s.request_id for s in submitted}) == 4
    # each prompt counted once, every choice's tokens counted
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13,
                               "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [([65, 66, 67], [(65, 66, 67)]), ([[65, 66], [67]], [(65, 66), (67,)])],
)
async def test_token_id_prompts(
    client: Client, runner: FakeRunner, prompt: Any, expected: list[tuple[int, ...]]
) -> None:
    body = {"model": BASE, "prompt": prompt, "max_tokens": 1}
    answer = await ok_json(await client.post("/v1/completions", json=body))
    assert len(answer["choices"]) == len(expected)
    assert sorted(seq.prompt_ids for seq in runner.new_seqs()) == expected


async def test_sglang_extensions_reach_the_runner(client: Client, runner: FakeRunner) -> None:
    body = {
        "model": BASE, "prompt": "x", "max_tokens": 2, "top_k": 5, "min_p": 0.1,
        "ignore_eos": True, "stop": "zz", "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "top_p": 0.9, "repetition_penalty": 1.1, "stop_token_ids": [3],
    }  # fmt: skip
    await ok_json(await client.post("/v1/completions", json=body))
    (seq,) = runner.new_seqs()
    params = seq.params
    assert (params.top_k, params.min_p, params.ignore_eos, params.stop) == (5, 0.1, True, ("zz",))
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert (params.top_p, params.repetition_penalty, params.stop_token_ids) == (0.9, 1.1, (3,))


async def test_completion_logprobs_legacy_format(client: Client) -> None:
    body = {"model": BASE, "prompt": "a", "max_tokens": 2, "logprobs": 2, "temperature": 0}
    answer = await ok_json(await client.post("/v1/completions", json=body))
    logprobs = answer["choices"][0]["logprobs"]
    first, second = expect("a", None, 2)
    # FakeRunner: logprob -0.5, and the sampled token as the only alternative it reports
    assert logprobs == {
        "tokens": [first, second],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{first: -0.5}, {second: -0.5}],
        "text_offset": [0, 1],
    }


async def test_chat_shape_messages_and_logprobs(client: Client, runner: FakeRunner) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "x"}],
        },
        {"role": "assistant", "content": "ok", "refusal": None},  # extra OpenAI fields are fine
        {"role": "user", "content": "again"},
    ]
    body = {"model": "a", "messages": messages, "max_tokens": 2, "logprobs": True,
            "top_logprobs": 1, "temperature": 0}  # fmt: skip
    answer = await ok_json(await client.post("/v1/chat/completions", json=body))
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("chatcmpl-")
    rendered = chat_prompt([
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nx"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"},
    ])  # fmt: skip
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": expect(rendered, "a", 2)}
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [entry["logprob"] for entry in content] == [-0.5, -0.5]
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert [len(entry["top_logprobs"]) for entry in content] == [1, 1]
    (seq,) = runner.new_seqs()
    assert seq.prompt_ids == tuple(ord(c) for c in rendered)
    assert (seq.params.logprobs, seq.params.top_logprobs) == (True, 1)


async def test_chat_without_max_tokens_runs_to_the_context_length(
    client: Client, runner: FakeRunner
) -> None:
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
    answer = await ok_json(await client.post("/v1/chat/completions", json=body))
    (seq,) = runner.new_seqs()
    assert seq.params.max_new_tokens == CONTEXT_LENGTH
    prompt = len(chat_prompt([{"role": "user", "content": "hi"}]))
    assert answer["usage"]["completion_tokens"] == CONTEXT_LENGTH - prompt
    assert answer["choices"][0]["finish_reason"] == "length"


async def test_completion_stream_with_usage(client: Client) -> None:
    body = {"model": BASE, "prompt": "hey", "max_tokens": 3, "stream": True, "n": 2,
            "temperature": 0, "stream_options": {"include_usage": True}}  # fmt: skip
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    chunks = sse_json(sse_events(await resp.read()))
    *deltas, last = chunks
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    for index in (0, 1):
        mine = [c["choices"][0] for c in deltas if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == expect("hey", None, 3)
        assert [c["finish_reason"] for c in mine] == [None, None, "length"]
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in deltas)


async def test_chat_stream_role_first_then_content(client: Client) -> None:
    messages = [{"role": "user", "content": "q"}]
    body = {"model": "b", "messages": messages, "max_tokens": 2, "stream": True,
            "temperature": 0}  # fmt: skip
    resp = await client.post("/v1/chat/completions", json=body)
    chunks = sse_json(sse_events(await resp.read()))
    first, second = expect(chat_prompt(messages), "b", 2)
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": first},
        {"content": second},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


async def test_model_cards(client: Client) -> None:
    listed = await ok_json(await client.get("/v1/models"))
    assert [m["id"] for m in listed["data"]] == [BASE, "a", "b"]
    for model_id, parent in [(BASE, None), ("a", BASE), (f"{BASE}:b", BASE)]:
        card = await ok_json(await client.get(f"/v1/models/{model_id}"))
        assert (card["id"], card["parent"], card["object"]) == (model_id, parent, "model")
    error = await openai_error(await client.get("/v1/models/nope"), 404)
    assert (error["type"], error["code"]) == ("not_found_error", "model_not_found")


# ----------------------------------------------------------------------------- errors


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("route", "body", "status", "needle"),
    [
        (COMPLETIONS, {"prompt": "x"}, 400, "missing required field `model`"),
        (CHAT, {"model": BASE}, 400, "missing required field `messages`"),
        (CHAT, {"model": BASE, "messages": "hi"}, 400, "$.messages"),
        (CHAT, {"model": BASE, "messages": []}, 400, "at least one message"),
        (CHAT, {"model": BASE, "messages": [{"content": "x"}]}, 400, "`role`"),
        (CHAT, {"model": BASE, "messages": [{"role": "robot", "content": "x"}]}, 400,
         "messages[0].role: 'robot'"),
        (CHAT, {"model": BASE, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        (CHAT, {"model": BASE, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "messages[0].content[1]: parts of type 'image_url' are not supported"),
        (CHAT, {"model": BASE, "messages": USER, "n": 0}, 400, "$.n"),
        (CHAT, {"model": BASE, "messages": USER, "n": 17}, 400, "<= 16 - at `$.n`"),
        (COMPLETIONS, {"model": BASE, "prompt": "x", "max_tokens": 0}, 400, "$.max_tokens"),
        (CHAT, {"model": BASE, "messages": USER, "max_tokens": -5}, 400, "$.max_tokens"),
        (CHAT, {"model": BASE, "messages": USER, "temperature": -0.1}, 400,
         "temperature must be >= 0, got -0.1"),
        (CHAT, {"model": BASE, "messages": USER, "top_p": 0}, 400, "top_p must be in (0, 1]"),
        (CHAT, {"model": BASE, "messages": USER, "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
        (CHAT, {"model": BASE, "messages": USER, "presence_penalty": 3}, 400,
         "presence_penalty must be in [-2, 2], got 3"),
        (COMPLETIONS, {"model": BASE, "prompt": "x", "logprobs": 21}, 400, "$.logprobs"),
        (CHAT, {"model": BASE, "messages": USER, "logprobs": True, "top_logprobs": 21},
         400, "top_logprobs must be in [0, 20], got 21"),
        (CHAT, {"model": BASE, "messages": USER, "top_logprobs": 2}, 400,
         "requires logprobs"),
        (CHAT, {"model": BASE, "messages": USER, "n": "2"}, 400, "Expected `int`"),
        (CHAT, {"model": 5, "messages": USER}, 400, "$.model"),
        (COMPLETIONS, {"model": BASE, "prompt": "x", "stream_options": {
            "include_usage": True}}, 400, "stream_options: only allowed with stream=true"),
        (COMPLETIONS, {"model": BASE, "prompt": "x", "temprature": 0}, 400, "temprature"),
        (COMPLETIONS, {"model": BASE, "prompt": [1, "a"]}, 400, "prompt must be"),
        (COMPLETIONS, {"model": BASE, "prompt": []}, 400, "prompt: an empty list"),
        (COMPLETIONS, {"model": BASE, "prompt": ""}, 400, "the prompt is empty"),
        (COMPLETIONS, {"model": BASE, "prompt": "x", "echo": True}, 400, "echo"),
        (COMPLETIONS, {"model": BASE, "prompt": "x", "best_of": 3}, 400, "best_of"),
        (COMPLETIONS, {"model": BASE, "prompt": "x", "logit_bias": {"1": 5}}, 400,
         "logit_bias"),
        (CHAT, {"model": BASE, "messages": USER, "tools": [{"type": "function"}]}, 400,
         "tools"),
        (CHAT, {"model": BASE, "messages": USER, "response_format": {
            "type": "json_object"}}, 400, "response_format"),
        (COMPLETIONS, {"model": BASE, "prompt": ["x", "y"], "lora_path": ["a"]}, 400,
         "lora_path has 1 entries for 2 prompt(s)"),
        (COMPLETIONS, {"model": "nope", "prompt": "x"}, 404, "The model `nope` does not exist"),
        (CHAT, {"model": f"{BASE}:nope", "messages": USER}, 404, "does not exist"),
        (CHAT, {"model": "a:b", "messages": USER}, 404, "does not exist"),
        (COMPLETIONS, {"model": BASE, "prompt": "x", "lora_path": "nope"}, 404,
         "adapter 'nope' is not loaded"),
        (COMPLETIONS, {"model": BASE, "prompt": "x", "max_tokens": 300}, 400,
         "max_new_tokens 300 exceeds the context length 256"),
        (COMPLETIONS, {"model": BASE, "prompt": "x" * 300}, 413, "300 tokens"),
    ],
)  # fmt: skip
async def test_bad_requests_are_4xx_in_openai_shape(
    client: Client, route: str, body: dict[str, Any], status: int, needle: str
) -> None:
    error = await openai_error(await client.post(route, json=body), status)
    assert needle in error["message"]
    expected_type = {400: "invalid_request_error", 404: "not_found_error", 413: (
        "invalid_request_error")}[status]  # fmt: skip
    assert error["type"] == expected_type
    if status == 404:
        assert error["code"] == ("adapter_not_found" if "lora_path" in body else "model_not_found")
    still = await client.post(COMPLETIONS, json={"model": BASE, "prompt": "ok"})
    assert still.status == 200


async def test_invalid_json_and_wrong_method(client: Client) -> None:
    error = await openai_error(await client.post(CHAT, data=b"{"), 400)
    assert "invalid JSON" in error["message"]
    error = await openai_error(await client.get(CHAT), 405)
    assert error["type"] == "invalid_request_error"


async def test_mid_stream_failure_is_an_error_event(client: Client, runner: FakeRunner) -> None:
    runner.fail_at_step = 3  # prefill (token 1), decode (token 2), then the crash
    body = {"model": BASE, "prompt": "x", "max_tokens": 5, "stream": True, "temperature": 0}
    resp = await client.post(COMPLETIONS, json=body)
    assert resp.status == 200
    chunks = sse_json(sse_events(await resp.read()))
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == expect("x", None, 2)
    error = chunks[-1]["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "service_unavailable_error",
        None,
        "engine_dead",
    )
    assert "fake GPU failure at step 3" in error["message"]


async def test_early_failure_keeps_its_status_when_streaming(
    client: Client, runner: FakeRunner
) -> None:
    runner.fail_at_step = runner.num_steps_started + 1
    body = {"model": BASE, "messages": USER, "max_tokens": 5, "stream": True}
    error = await openai_error(await client.post(CHAT, json=body), 503)
    assert error["code"] == "engine_dead"


async def test_overload_is_a_503_and_earlier_choices_are_aborted(
    make_client: MakeClient, runner: FakeRunner
) -> None:
    client = await make_client(max_running_requests=1, max_queued_requests=2)  # 3 in flight
    engine = client.app[ENGINE_KEY]
    runner.gate.clear()  # one request holds a place until the gate opens
    held = asyncio.ensure_future(client.post(COMPLETIONS, json={"model": BASE, "prompt": "h"}))
    await wait_until(lambda: len(engine.request_ids()) == 1, "one request in flight")
    body = {"model": BASE, "prompt": "x", "n": 3, "max_tokens": 2}  # fits an idle server only
    error = await openai_error(await client.post(COMPLETIONS, json=body), 503)
    assert (error["type"], error["code"]) == ("service_unavailable_error", "overloaded")
    assert len(engine.request_ids()) == 1
    runner.gate.set()
    assert (await held).status == 200
    await wait_until(lambda: engine.last_stats.num_aborted == 2, "the first two are aborted")
    assert engine.last_stats.num_finished == 3  # the held one and the two aborted


async def test_disconnect_aborts_every_choice(server: Server) -> None:
    engine = server.engine
    server.runner.step_delay_s = 0.002  # simulated GPU time: 200 tokens take a while
    body = {"model": BASE, "prompt": "x", "max_tokens": 200, "n": 3, "stream": True,
            "ignore_eos": True}  # fmt: skip
    async with (
        asyncio.timeout(TIMEOUT_S),
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}{COMPLETIONS}", json=body) as resp,
    ):
        assert resp.status == 200
        await resp.content.readline()  # the first chunk: requests are running
    await wait_until(lambda: engine.last_stats.num_aborted == 3, "all three choices aborted")
    assert engine.request_ids() == ()
    assert engine.last_stats.num_kv_pages_used == 0


async def test_new_routes_need_the_key_which_never_reaches_the_logs(
    make_client: MakeClient, caplog: Any
) -> None:
    client = await make_client(api_key=KEY)
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", COMPLETIONS, {"model": BASE, "prompt": "x", "max_tokens": 1}),
        ("POST", CHAT, {"model": BASE, "messages": USER, "max_tokens": 1}),
        ("GET", f"/v1/models/{BASE}", None),
        ("GET", "/metrics", None),
    ]
    with caplog.at_level(logging.DEBUG):
        for method, route, body in requests:
            for headers in ({}, {"Authorization": "Bearer wrong-key-9"}):
                resp = await client.request(method, route, headers=headers, json=body)
                assert resp.status == 401, route
            good = {"Authorization": f"Bearer {KEY}"}
            resp = await client.request(method, route, headers=good, json=body)
            assert resp.status == 200, (route, await resp.text())
    error = (await (await client.post(CHAT, json=requests[1][2])).json())["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "unauthorized")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert KEY not in logged
    assert "wrong-key-9" not in logged


# ----------------------------------------------------------------------------- real server


@pytest.fixture
async def keyed() -> AsyncIterator[Server]:
    """A live server that wants the API key, for the official `openai` client."""
    async with asyncio.timeout(TIMEOUT_S), real_server() as srv:
        yield srv


def async_client(server: Server, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S
    )


async def generate(server: Server, text: str, lora: str | None, num: int) -> dict[str, Any]:
    body = {"text": text, "lora_path": lora,
            "sampling_params": {"max_new_tokens": num, "temperature": 0}}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with session.post(f"{server.url}/generate", json=body, headers=headers) as resp:
            assert resp.status == 200
            result: dict[str, Any] = await resp.json()
            return result


async def test_openai_completions_equal_generate(keyed: Server) -> None:
    client = async_client(keyed)
    async with asyncio.timeout(TIMEOUT_S):
        for lora, model in [("a", "a"), ("b", f"{BASE}:b"), (None, BASE)]:
            reference = await generate(keyed, "hello there", lora, 12)
            assert reference["text"] == expect("hello there", lora, 12)
            answer = await client.completions.create(
                model=model, prompt="hello there", max_tokens=12, temperature=0
            )
            assert answer.choices[0].text == reference["text"]
            assert answer.choices[0].finish_reason == "length"
            assert answer.usage is not None
            assert answer.usage.prompt_tokens == len("hello there")
            assert answer.usage.completion_tokens == 12
            assert answer.usage.total_tokens == len("hello there") + 12


async def test_sync_client_in_a_thread(keyed: Server) -> None:
    client = openai.OpenAI(
        base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT_S
    )
    async with asyncio.timeout(TIMEOUT_S):
        answer = await asyncio.to_thread(
            client.completions.create, model="a", prompt=["ab", "xyz"], n=2, max_tokens=5,
            temperature=0,
        )  # fmt: skip
        models = await asyncio.to_thread(client.models.list)
    assert [c.text for c in answer.choices] == [expect("ab", "a", 5)] * 2 + [
        expect("xyz", "a", 5)
    ] * 2
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 20)
    assert [m.id for m in models.data] == [BASE, "a", "b"]
    client.close()


async def test_chat_stream_concatenates_to_the_plain_answer(keyed: Server) -> None:
    client = async_client(keyed)
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi there"}]
    async with asyncio.timeout(TIMEOUT_S):
        plain = await client.chat.completions.create(
            model="b", messages=messages, max_tokens=10, temperature=0
        )
        stream = await client.chat.completions.create(
            model="b", messages=messages, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
    text = plain.choices[0].message.content
    assert text == expect(chat_prompt(messages), "b", 10)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    usage, plain_usage = chunks[-1].usage, plain.usage
    assert usage is not None
    assert plain_usage is not None
    assert plain_usage.prompt_tokens_details is not None
    assert plain_usage.prompt_tokens_details.cached_tokens == 0
    # the same prompt again: its full pages (4 tokens each) come from the prefix cache
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 4 * 4
    assert usage.model_dump(exclude={"prompt_tokens_details"}) == plain_usage.model_dump(
        exclude={"prompt_tokens_details"}
    )
    assert plain.usage is not None
    assert plain.usage.prompt_tokens == len(chat_prompt(messages))
    assert plain.usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


async def test_stop_string_and_logprobs_through_the_real_engine(keyed: Server) -> None:
    client = async_client(keyed)
    full = expect("stop here", None, 20)
    stop = full[6:8]
    async with asyncio.timeout(TIMEOUT_S):
        answer = await client.completions.create(
            model=BASE, prompt="stop here", max_tokens=20, temperature=0, stop=[stop], logprobs=1
        )
    choice = answer.choices[0]
    assert choice.text == full[: full.find(stop)]
    assert choice.finish_reason == "stop"
    assert choice.logprobs is not None
    assert choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens).startswith(choice.text)
    assert set(choice.logprobs.token_logprobs or []) == {-0.5}
    assert answer.usage is not None
    assert answer.usage.completion_tokens == len(choice.logprobs.tokens)


async def test_openai_exceptions(keyed: Server) -> None:
    client = async_client(keyed)
    async with asyncio.timeout(TIMEOUT_S):
        with pytest.raises(openai.NotFoundError) as not_found:
            await client.completions.create(model="nope", prompt="x", max_tokens=2)
        assert not_found.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve(f"{BASE}:zzz")
        for bad in ({"n": 0}, {"temperature": -1}, {"max_tokens": 0}, {"top_p": 2}):
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(
                    model="a", messages=[{"role": "user", "content": "x"}], **bad
                )
        with pytest.raises(openai.APIStatusError) as too_long:
            await client.completions.create(model=BASE, prompt="y" * 300, max_tokens=2)
        assert too_long.value.status_code == 413
        with pytest.raises(openai.AuthenticationError):
            await async_client(keyed, "wrong").completions.create(model=BASE, prompt="x")
        with pytest.raises(openai.AuthenticationError):  # no Authorization header at all
            await client.completions.create(
                model=BASE, prompt="x", extra_headers={"Authorization": openai.omit}
            )
        ok = await client.completions.create(model=BASE, prompt="still", max_tokens=1)
    assert ok.choices[0].text == expect("still", None, 1)


async def test_stream_errors_raise_in_the_client(keyed: Server) -> None:
    client = async_client(keyed)
    async with asyncio.timeout(TIMEOUT_S):
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="zzz", messages=[{"role": "user", "content": "x"}], stream=True
            )
        stream = await client.completions.create(
            model="a", prompt="x", max_tokens=3, stream=True, n=2
        )
        texts: dict[int, str] = {}
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: expect("x", "a", 3), 1: expect("x", "a", 3)}


async def test_raw_sse_framing_over_loopback(keyed: Server) -> None:
    body = {"model": "a", "prompt": "raw", "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{keyed.url}{COMPLETIONS}"
    async with (
        asyncio.timeout(TIMEOUT_S),
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as resp,
    ):
        raw = await resp.read()
    chunks = sse_json(sse_events(raw))
    assert "".join(c["choices"][0]["text"] for c in chunks) == expect("raw", "a", 4)
