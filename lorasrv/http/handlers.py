"""Route handlers: decode the body, call the engine, encode the answer; SSE for streams.

A vanished client aborts its request: a stream's iterator is closed in `finally`, and the server
runs with `handler_cancellation=True` so a waiting non-streaming handler is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from lorasrv.errors import BadRequest, EngineDead, LorasrvError
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
from lorasrv.http.state import CONFIG_KEY, CREATED_KEY, ENGINE_KEY, EngineLike, SamplingArg
from lorasrv.messages import AdapterOpDone

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
    params = merge_logprob_fields(body)
    single_ids, batch_ids = split_input_ids(body.input_ids)
    if body.stream:
        if batch_ids is not None:
            raise BadRequest("stream: input_ids is a batch; stream one prompt per request")
        chunks = engine.stream(
            text=_not_batch("text", body.text),
            input_ids=single_ids,
            sampling_params=_not_batch("sampling_params", params),
            lora_path=_not_batch("lora_path", body.lora_path),
            rid=_not_batch("rid", body.rid),
        )
        return await stream_sse(request, chunks)
    result = await engine.generate(
        text=body.text,
        input_ids=single_ids if batch_ids is None else batch_ids,
        sampling_params=params,
        lora_path=body.lora_path,
        rid=body.rid,
    )
    return json_response(result)


def _not_batch(field: str, value: _T | list[Any]) -> _T:
    if isinstance(value, list):
        raise BadRequest(f"stream: {field} is a list; stream one prompt per request")
    return value


def split_input_ids(
    raw: list[int | list[int]] | None,
) -> tuple[list[int] | None, list[list[int]] | None]:
    """`input_ids` as (one prompt, None) or (None, a batch); a mix of both is a 400."""
    if raw is None:
        return None, None
    ids = [item for item in raw if isinstance(item, int)]
    if len(ids) == len(raw):
        return ids, None
    batch = [item for item in raw if isinstance(item, list)]
    if len(batch) == len(raw):
        return None, batch
    raise BadRequest("input_ids: expected a list of token ids or a list of such lists, not a mix")


def merge_logprob_fields(body: GenerateRequest) -> SamplingArg:
    """Fold SGLang's top-level `return_logprob`/`top_logprobs_num` into sampling_params."""
    starts = body.logprob_start_len
    if any(start != -1 for start in (starts if isinstance(starts, list) else [starts])):
        raise BadRequest("logprob_start_len: prompt logprobs are not supported; leave it at -1")
    fields = (body.sampling_params, body.return_logprob, body.top_logprobs_num)
    if not any(_item(body.return_logprob, i) for i in range(_len(body.return_logprob))):
        return body.sampling_params
    sizes = {len(value) for value in fields if isinstance(value, list)}
    if len(sizes) > 1:
        raise BadRequest(
            "sampling_params, return_logprob and top_logprobs_num: lists of different lengths"
        )
    if not sizes:  # all scalars: one dict, as given
        return _with_logprobs(*(_item(value, 0) for value in fields))
    return [_with_logprobs(*(_item(value, i) for value in fields)) for i in range(sizes.pop())]


def _len(value: object) -> int:
    return len(value) if isinstance(value, list) else 1


def _item(value: Any, index: int) -> Any:
    return value[index] if isinstance(value, list) else value


def _with_logprobs(
    params: dict[str, Any] | None, return_logprob: bool, top_logprobs_num: int
) -> dict[str, Any]:
    merged = dict(params or {})
    if return_logprob:
        merged["logprobs"] = True
        merged["top_logprobs"] = top_logprobs_num
    return merged


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


async def _adapter_failure(engine: EngineLike, exc: LorasrvError) -> web.Response:
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
    resolved = engine.model_info().get("model_path")
    root = str(resolved or request.app[CONFIG_KEY].model.model_path or served)
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
            await engine.generate(input_ids=[0], sampling_params={"max_new_tokens": 1})
    except TimeoutError:
        return error_response(EngineDead(f"no token within {HEALTH_GENERATE_TIMEOUT_S:g} s"))
    except LorasrvError as exc:
        return error_response(EngineDead(f"generate failed: {exc.detail}"))
    return json_response({"status": "ok"})


async def get_model_info(request: web.Request) -> web.Response:
    return json_response(request.app[ENGINE_KEY].model_info())


async def get_server_info(request: web.Request) -> web.Response:
    info = await request.app[ENGINE_KEY].server_info()
    return json_response(redact(msgspec.to_builtins(info)))


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
