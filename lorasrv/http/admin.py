"""Adapter admin routes in their two dialects. SGLang (`/load_lora_adapter`,
`/unload_lora_adapter`): `{success, error_message, loaded_adapters}`, 200 or 400. vLLM (`/v1/`):
plain-text success, OpenAI-shaped errors with the error's own status (404 for a missing folder
or an unknown name), `load_inplace` to replace a loaded adapter.
"""

from __future__ import annotations

import logging

from aiohttp import web

from lorasrv.engine.adapter_admin import HOST_DROPPED, live_adapters
from lorasrv.engine.engine import Engine
from lorasrv.errors import LorasrvError
from lorasrv.http.handlers import decode_body
from lorasrv.http.responses import json_response
from lorasrv.http.schemas import (
    AdapterOpResponse,
    LoadLoraRequest,
    UnloadLoraRequest,
    VllmLoadLoraRequest,
    VllmUnloadLoraRequest,
)
from lorasrv.http.state import ENGINE_KEY

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- SGLang


async def load_lora_adapter(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        body = await decode_body(request, LoadLoraRequest)
        # SGLang forgets an adapter that the host cap dropped; lorasrv keeps it registered, so
        # pinning it again is a replacement (a fresh version, pinned), not "already loaded".
        replace = body.pinned and await _host_of(engine, body.lora_name) == HOST_DROPPED
        done = await engine.load_adapter(
            body.lora_name, body.lora_path, pinned=body.pinned, replace=replace
        )
    except LorasrvError as exc:
        return await _sglang_failure(engine, exc)
    log.info("loaded adapter %s from %s (pinned=%s)", body.lora_name, body.lora_path, body.pinned)
    return json_response(AdapterOpResponse(success=True, loaded_adapters=done.loaded_adapters))


async def unload_lora_adapter(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        body = await decode_body(request, UnloadLoraRequest)
        done = await engine.unload_adapter(body.lora_name)
    except LorasrvError as exc:
        return await _sglang_failure(engine, exc)
    log.info("unloaded adapter %s", body.lora_name)
    return json_response(AdapterOpResponse(success=True, loaded_adapters=done.loaded_adapters))


async def flush_cache(request: web.Request) -> web.Response:
    """SGLang's /flush_cache: drop every cached KV page no request uses (those in use stay,
    so it never waits for requests to finish). Errors raise (the middleware answers them)."""
    num_pages = await request.app[ENGINE_KEY].flush_cache()
    log.info("flushed the prefix cache: %d pages", num_pages)
    return web.Response(text=f"Cache flushed: {num_pages} unused cached pages dropped.")


async def _sglang_failure(engine: Engine, exc: LorasrvError) -> web.Response:
    """SGLang's admin shape for every failure: 400 (or the error's own 5xx)."""
    try:
        statuses = live_adapters(await engine.describe_adapters()).values()
        loaded = {s.name: s.path for s in statuses if s.num_loads > 0}
    except LorasrvError:
        loaded = {}
    body = AdapterOpResponse(success=False, error_message=exc.detail, loaded_adapters=loaded)
    return json_response(body, status=exc.status if exc.status >= 500 else 400)


async def _host_of(engine: Engine, name: str) -> str | None:
    status = live_adapters(await engine.describe_adapters()).get(name)
    return None if status is None else status.host


# ----------------------------------------------------------------------------- vLLM


async def vllm_load_lora_adapter(request: web.Request) -> web.Response:
    """Errors raise: the middleware answers them in OpenAI's shape (everything under /v1/)."""
    engine = request.app[ENGINE_KEY]
    body = await decode_body(request, VllmLoadLoraRequest)
    await engine.load_adapter(
        body.lora_name, body.lora_path, pinned=body.pinned, replace=body.load_inplace
    )
    log.info("loaded adapter %s from %s (in place: %s)", body.lora_name, body.lora_path,
             body.load_inplace)  # fmt: skip
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def vllm_unload_lora_adapter(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    body = await decode_body(request, VllmUnloadLoraRequest)
    await engine.unload_adapter(body.lora_name)
    log.info("unloaded adapter %s", body.lora_name)
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
