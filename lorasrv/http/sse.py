"""Server-sent events for `/generate` with `stream: true`: SGLang framing, errors as events.

Closing the engine's iterator in `finally` is what aborts the request of a vanished client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Final

import msgspec
from aiohttp import web

from lorasrv.errors import LorasrvError
from lorasrv.http.responses import error_body

log = logging.getLogger(__name__)

SSE_HEADERS: Final[dict[str, str]] = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must not buffer the stream
}
DONE_EVENT: Final = b"data: [DONE]\n\n"


async def stream_sse(
    request: web.Request, chunks: AsyncIterator[dict[str, Any]]
) -> web.StreamResponse:
    """SSE: `data: {json}` per chunk, then `data: [DONE]`; a mid-stream error is an event too.

    The first chunk is awaited before the response starts, so early errors keep their status.
    """
    try:
        first = await anext(chunks, None)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            await _pump(response, first, chunks)
            await response.write(DONE_EVENT)
        except ConnectionResetError:
            log.info("stream %s: client disconnected", _chunk_id(first))
        return response
    finally:
        # NOTE: closing the iterator is what aborts the engine request when the client is gone.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def _pump(
    response: web.StreamResponse,
    first: dict[str, Any] | None,
    chunks: AsyncIterator[dict[str, Any]],
) -> None:
    try:
        if first is not None:
            await _send(response, first)
        async for chunk in chunks:
            await _send(response, chunk)
    except ConnectionResetError:
        raise
    except LorasrvError as exc:
        log.info("stream %s failed: %s %s", _chunk_id(first), exc.code, exc)
        await _send(response, error_body(exc))
    except Exception:
        log.exception("stream %s failed", _chunk_id(first))
        await _send(response, error_body(LorasrvError("internal server error")))


async def _send(response: web.StreamResponse, payload: object) -> None:
    await response.write(b"data: " + msgspec.json.encode(payload) + b"\n\n")


def _chunk_id(chunk: dict[str, Any] | None) -> str:
    meta = chunk.get("meta_info") if chunk else None
    return str(meta.get("id", "-")) if isinstance(meta, dict) else "-"
