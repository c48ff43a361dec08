"""Route handlers: decode the body, call the engine, encode the answer; SSE for streams.

A vanished client aborts its request: a stream's iterator is closed in `finally`, and the server
runs with `handler_cancellation=True` so a waiting non-streaming handler is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from lorasrv.engine.engine import Engine
from lorasrv.engine.request_handle import RequestHandle
from lorasrv.engine.requests import Submission
from lorasrv.engine.results import ResultBuilder
from lorasrv.errors import BadRequest, EngineDead, LorasrvError
from lorasrv.http import sglang
from lorasrv.http.outputs import abort_all, collect, merged, submit_all
from lorasrv.http.responses import error_response, json_response
from lorasrv.http.schemas import (
    AdapterOpResponse,
    GenerateRequest,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    UnloadLoraRequest,
)
from lorasrv.http.sse import stream_sse
from lorasrv.http.state import CONFIG_KEY, CREATED_KEY, ENGINE_KEY
from lorasrv.messages import AdapterOpDone, SamplingParams

log = logging.getLogger(__name__)

_T = TypeVar("_T")

HEALTH_GENERATE_TIMEOUT_S: Final = 30.0
SECRET_KEYS: Final = frozenset({"api_key", "admin_api_key"})


async def decode_body(request: web.Request, cls: type[_T]) -> _T:
    """The JSON body as `cls`; any problem is a BadRequest naming it (msgspec gives the path)."""
    raw = await request.read()  # raises 413 beyond the app's client_max_size
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
            return await stream_sse(request, _chunks(handles, batch, started_s))
        builders = await collect(handles)
        items = [
            sglang.generate_item(b.result(), started_s, want_logprobs=batch.want_logprobs[i])
            for i, b in enumerate(builders)
        ]
        return json_response(items if batch.is_batch else items[0])
    finally:
        abort_all(handles)  # no-op for finished ones; frees the rest on error or disconnect


async def _chunks(
    handles: list[RequestHandle], batch: sglang.GenerateBatch, started_s: float
) -> AsyncIterator[dict[str, Any]]:
    """Cumulative /generate dicts as outputs arrive; a batch's carry their output `index`."""
    builders = [ResultBuilder(handle.request_id) for handle in handles]
    async with contextlib.aclosing(merged(handles)) as outputs:
        async for index, out in outputs:
            builders[index].add(out)
            yield sglang.generate_item(
                builders[index].result(), started_s,
                want_logprobs=batch.want_logprobs[index],
                index=index if batch.is_batch else None,
            )  # fmt: skip


# ----------------------------------------------------------------------------- adapters


async def load_lora_adapter(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        body = await decode_body(request, LoadLoraRequest)
        done = await engine.load_adapter(body.lora_name, body.lora_path, pinned=body.pinned)
    except LorasrvError as exc:
        return await _adapter_failure(engine, exc)
    log.info("load adapter %s from %s: success=%s", body.lora_name, body.lora_path, done.success)
    return _adapter_result(done)


async def unload_lora_adapter(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        body = await decode_body(request, UnloadLoraRequest)
        done = await engine.unload_adapter(body.lora_name)
    except LorasrvError as exc:
        return await _adapter_failure(engine, exc)
    log.info("unload adapter %s: success=%s", body.lora_name, done.success)
    return _adapter_result(done)


def _adapter_result(done: AdapterOpDone) -> web.Response:
    body = AdapterOpResponse(
        success=done.success,
        error_message=done.error_message,
        loaded_adapters=dict(done.loaded_adapters),
    )
    return json_response(body, status=200 if done.success else 400)


async def _adapter_failure(engine: Engine, exc: LorasrvError) -> web.Response:
    """Admin routes answer failures in their own shape: 400, or the error's 5xx."""
    try:
        loaded = {status.name: status.path for status in await engine.describe_adapters()}
    except LorasrvError:
        loaded = {}
    body = AdapterOpResponse(success=False, error_message=exc.detail, loaded_adapters=loaded)
    return json_response(body, status=exc.status if exc.status >= 500 else 400)


# ----------------------------------------------------------------------------- info


async def list_models(request: web.Request) -> web.Response:
    return json_response(ModelList(data=await model_cards(request)))


async def model_cards(request: web.Request) -> list[ModelCard]:
    """The base model's card, then one per registered adapter (also for /v1/models/{id})."""
    engine = request.app[ENGINE_KEY]
    created = request.app[CREATED_KEY]
    served = engine.served_model_name
    # NOTE: the engine may resolve the model at start (demo model, Hub id), so ask it first.
    root = engine.model_path or request.app[CONFIG_KEY].model.model_path or served
    cards = [ModelCard(id=served, created=created, root=root, parent=None)]
    cards += [
        ModelCard(id=status.name, created=created, root=status.path, parent=served)
        for status in await engine.describe_adapters()
    ]
    return cards


async def health(request: web.Request) -> web.Response:
    if request.app[ENGINE_KEY].is_healthy():
        return json_response({"status": "ok"})
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
