"""Request body bytes: Content-Encoding undone here, bounded, and corrupt data a 400.

`serve` runs aiohttp with its own decompression off (`make_runner` marks the app), so a body that
aiohttp would fail on below the routes (brotli, zstd, a corrupt first chunk) still reaches its
route and gets that route's error shape. An app served with aiohttp's default decompression keeps
working; only its payload errors are mapped here (aiohttp then logs them as well).
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Final

from aiohttp import web

from lorasrv.errors import BadRequest

#: set by `make_runner`: aiohttp hands the body over still encoded
RAW_BODIES_KEY: Final = web.AppKey("raw_bodies", bool)
#: the decoded body may not exceed the app's body limit either (a small gzip can inflate to GBs)
MAX_BODY_KEY: Final = web.AppKey("max_body_bytes", int)
SUPPORTED: Final = "identity, gzip, deflate"
_WBITS: Final = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": 0}


async def read_body(request: web.Request) -> bytes:
    """The request body as sent before any Content-Encoding; BadRequest if it cannot be decoded."""
    coding = request.headers.get("Content-Encoding", "").strip()
    try:
        raw = await request.read()  # raises 413 beyond the app's client_max_size
    except web.RequestPayloadError:
        # aiohttp inflated the body and failed (an app not run by `make_runner`); aiohttp still
        # logs the broken stream when it drains it after the answer.
        raise BadRequest(f"request body: cannot decode Content-Encoding {coding!r}") from None
    if not coding or not request.app.get(RAW_BODIES_KEY, False):
        return raw
    max_size = request.app.get(MAX_BODY_KEY, 1 << 25)
    # zlib releases the GIL: a large body inflates without holding up the event loop.
    return await asyncio.to_thread(decode_content, raw, coding, max_size)


def decode_content(raw: bytes, header: str, max_size: int) -> bytes:
    """Undo a Content-Encoding header's codings, the last applied first."""
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding not in _WBITS:
            raise BadRequest(
                f"Content-Encoding {coding!r} is not supported; send the body as {SUPPORTED}"
            )
        raw = _inflate(raw, coding, max_size)
    return raw


def _inflate(data: bytes, coding: str, max_size: int) -> bytes:
    out = bytearray()
    while data:  # gzip allows several members, one after another
        inflater = zlib.decompressobj(_wbits(data, coding))
        try:
            out += inflater.decompress(data, max_size + 1 - len(out))
        except zlib.error as exc:
            raise BadRequest(f"request body: corrupt {coding} data ({exc})") from None
        if len(out) > max_size:
            raise web.HTTPRequestEntityTooLarge(max_size=max_size, actual_size=len(out))
        if not inflater.eof:
            raise BadRequest(f"request body: truncated {coding} data")
        data = inflater.unused_data
        if data and coding == "deflate":
            raise BadRequest("request body: data after the end of the deflate stream")
    return bytes(out)


def _wbits(data: bytes, coding: str) -> int:
    if coding != "deflate":
        return _WBITS[coding]
    # HTTP's deflate is zlib-wrapped; some clients send a raw deflate stream instead.
    is_zlib = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
    return zlib.MAX_WBITS if is_zlib else -zlib.MAX_WBITS
