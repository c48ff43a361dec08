"""Middlewares: errors to JSON bodies (no tracebacks to clients) and Bearer API-key checks.

Keys are compared with `hmac.compare_digest` and never logged or echoed.
"""

from __future__ import annotations

import enum
import hmac
import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from lorasrv.errors import LorasrvError, Unauthorized
from lorasrv.http.responses import error_response, http_error_response, is_openai_path

log = logging.getLogger(__name__)


class Access(enum.Enum):
    OPEN = "open"  # no key ever (liveness probes)
    USER = "user"  # `api_key` when set
    ADMIN = "admin"  # `admin_api_key` when set, else `api_key`


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LorasrvError as exc:
        log.info("%s %s -> %d %s: %s", request.method, request.path, exc.status, exc.code, exc)
        return error_response(exc, openai=is_openai_path(request.path))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error_response(request, exc)
    except ConnectionResetError:
        raise  # the client is gone; nobody to answer
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(
            LorasrvError("internal server error"), openai=is_openai_path(request.path)
        )


def auth_middleware(
    access_of: Mapping[str, Access], api_key: str | None, admin_api_key: str | None
) -> Middleware:
    """Require `Authorization: Bearer <key>` per route; unknown routes count as USER."""

    def required_key(request: web.Request) -> str | None:
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else request.path
        access = access_of.get(path, Access.USER)
        if access is Access.OPEN:
            return None
        if access is Access.ADMIN and admin_api_key is not None:
            return admin_api_key
        return api_key

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        key = required_key(request)
        if key is not None:
            problem = _bearer_problem(request.headers.get("Authorization"), key)
            if problem is not None:
                log.info("%s %s -> 401: %s", request.method, request.path, problem)
                return error_response(
                    Unauthorized(problem),
                    {"WWW-Authenticate": "Bearer"},
                    openai=is_openai_path(request.path),
                )
        return await handler(request)

    return check_key


def _bearer_problem(header: str | None, key: str) -> str | None:
    if not header:
        return "missing API key: send 'Authorization: Bearer <key>'"
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "malformed Authorization header: expected 'Bearer <key>'"
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        return "invalid API key"
    return None
