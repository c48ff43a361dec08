"""Route handlers: decode the body, call the engine, encode the answer; SSE for streams.

A vanished client aborts its request: a stream's iterator is closed in `finally`, and the server
runs with `handler_cancellation=True` so a waiting non-streaming handler is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from lorasrv.engine.requests import Submission
from lorasrv.errors import BadRequest, EngineDead, LorasrvError, ShuttingDown
from lorasrv.http import sglang
from lorasrv.http.bodies import read_body
from lorasrv.http.models import model_cards
from lorasrv.http.outputs import abort_all, collect, submit_all
from lorasrv.http.responses import error_response, json_response
from lorasrv.http.schemas import (
    AbortRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    ModelCard,
    ModelList,
    TokenizeBatchResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from lorasrv.http.sse import stream_sse
from lorasrv.http.state import CONFIG_KEY, CREATED_KEY, ENGINE_KEY
from lorasrv.messages import SamplingParams

log = logging.getLogger(__name__)

_T = TypeVar("_T")

HEALTH_GENERATE_TIMEOUT_S: Final = 30.0
SECRET_KEYS: Final = frozenset({"api_key", "admin_api_key"})


async def decode_body(request: web.Request, cls: type[_T]) -> _T:
    """The JSON body as `cls`; any problem is a BadRequest naming it (msgspec gives the path)."""
    raw = await read_body(request)  # Content-Encoding undone; 413 beyond the body limit
    if not raw.strip():
        raise BadRequest("invalid JSON: empty request body")
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None


# ----------------------------------------------------------------------------- /generate


async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    body = await decode_body(request, GenerateRequest)
    batch = sglang.parse_generate(body)
    started_s = time.monotonic()
    handles = submit_all(engine, batch.submissions)
    try:
        if body.stream:
            return await stream_sse(request, sglang.stream_items(handles, batch, started_s))
        builders = await collect(handles)
        items = [
            sglang.generate_item(b.result(), started_s, want_logprobs=batch.want_logprobs[i])
            for i, b in enumerate(builders)
        ]
        return json_response(items if batch.is_batch else items[0])
    finally:
        abort_all(handles)  # no-op for finished ones; frees the rest on error or disconnect


# ----------------------------------------------------------------------------- SGLang's tools


async def abort_request(request: web.Request) -> web.Response:
    """SGLang's: the request's reader gets what it had, finish reason "abort"; unknown ids are
    ignored. `abort_all` aborts every request in flight."""
    engine = request.app[ENGINE_KEY]
    body = await decode_body(request, AbortRequest)
    rids = engine.request_ids() if body.abort_all else (body.rid,)
    for rid in rids:
        engine.abort(rid)
    log.info("aborted %d request(s) by %s", len(rids), "abort_all" if body.abort_all else "rid")
    return web.Response()


async def tokenize(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = await decode_body(request, TokenizeRequest)
    encode = engine.tokenizer.encode
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    # NOTE: never on the event loop: a body may hold tens of MB of text
    ids = await asyncio.to_thread(
        lambda: [encode(p, add_special_tokens=body.add_special_tokens) for p in prompts]
    )
    limit = engine.ready_info.context_length
    if isinstance(body.prompt, str):
        return json_response(
            TokenizeResponse(tokens=ids[0], count=len(ids[0]), max_model_len=limit)
        )
    counts = [len(row) for row in ids]
    return json_response(TokenizeBatchResponse(tokens=ids, count=counts, max_model_len=limit))


async def detokenize(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = await decode_body(request, DetokenizeRequest)
    single, batch = sglang.split_token_lists(body.tokens, "tokens")
    vocab_size = engine.ready_info.vocab_size
    rows = [single] if single is not None else batch or []
    bad = [i for row in rows for i in row if not 0 <= i < vocab_size]
    if bad:
        raise BadRequest(f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    decode = engine.tokenizer.decode
    texts = await asyncio.to_thread(
        lambda: [decode(row, skip_special_tokens=body.skip_special_tokens) for row in rows]
    )
    return json_response(DetokenizeResponse(text=texts[0] if single is not None else texts))


# ----------------------------------------------------------------------------- info


async def list_models(request: web.Request) -> web.Response:
    return json_response(ModelList(data=await model_cards_of(request)))


async def model_cards_of(request: web.Request) -> list[ModelCard]:
    """The base model's card, then one per loaded adapter (also for /v1/models/{id})."""
    engine = request.app[ENGINE_KEY]
    # NOTE: the engine may resolve the model at start (demo model, Hub id), so ask it first.
    root = engine.model_path or request.app[CONFIG_KEY].model.model_path or ""
    return await model_cards(engine, request.app[CREATED_KEY], root or engine.served_model_name)


async def health(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    if engine.is_healthy():
        return json_response({"status": "ok"})
    if engine.draining is not None and engine.failure is None:
        return error_response(ShuttingDown(engine.draining))  # load balancers: stop sending
    return error_response(EngineDead("engine is not running"))


async def health_generate(request: web.Request) -> web.Response:
    """Liveness that proves a token can be generated (one token from token id 0)."""
    engine = request.app[ENGINE_KEY]
    if not engine.is_healthy():
        return error_response(EngineDead("engine is not running"))
    try:
        async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT_S):
            await engine.generate(
                Submission(input_ids=(0,), params=SamplingParams(max_new_tokens=1))
            )
    except TimeoutError:
        return error_response(EngineDead(f"no token within {HEALTH_GENERATE_TIMEOUT_S:g} s"))
    except LorasrvError as exc:
        return error_response(EngineDead(f"generate failed: {exc.detail}"))
    return json_response({"status": "ok"})


async def get_model_info(request: web.Request) -> web.Response:
    return json_response(sglang.model_info(request.app[ENGINE_KEY]))


async def get_server_info(request: web.Request) -> web.Response:
    info = await sglang.server_info(request.app[ENGINE_KEY])
    return json_response(redact(info))


def redact(value: Any) -> Any:
    """Replace API keys anywhere in a JSON-like tree; they must never leave the server."""
    if isinstance(value, dict):
        return {
            key: "<redacted>" if key in SECRET_KEYS and item is not None else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value
