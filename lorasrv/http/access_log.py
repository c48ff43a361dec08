"""The access log, with secrets left out: every query value, and the configured API keys wherever
they appear in the request line (a key sent as `?api_key=...` is refused, but would still be
logged). The lorasrv routes take no query parameters, so nothing useful is lost.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from lorasrv.http.state import CONFIG_KEY

REDACTED = "<redacted>"


def redacted_target(request: web.BaseRequest) -> str:
    """The request's path and query with query values and configured keys replaced."""
    target = request.path
    if request.query_string:
        names = (quote(name, safe="") for name in request.query)
        target += "?" + "&".join(f"{name}={REDACTED}" for name in names)
    config = request.app.get(CONFIG_KEY) if isinstance(request, web.Request) else None
    if config is not None:
        for key in (config.http.api_key, config.http.admin_api_key):
            if key:
                target = target.replace(key, REDACTED).replace(quote(key, safe=""), REDACTED)
    return target


class RedactingAccessLogger(AbstractAccessLogger):
    """`remote "METHOD target HTTP/x.y" status bytes seconds "user agent"`, at INFO."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        version = request.version
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fs "%s"',
            request.remote or "-",
            request.method,
            redacted_target(request),
            version.major,
            version.minor,
            response.status,
            response.body_length,
            time,
            request.headers.get("User-Agent", "-"),
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
