"""JSON and error responses. The one place that maps an error to its HTTP status and wire shape.

Two dialects. SGLang routes: `{"error": {"message", "type": <lorasrv code>, "code": <status>}}`.
OpenAI routes (everything under /v1/): `{"error": {"message", "type", "param", "code"}}` with
OpenAI's `type` for the status and the lorasrv code ("model_not_found"), as the openai client reads
them. Messages never carry tracebacks.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from aiohttp import web

from lorasrv.errors import LorasrvError
from lorasrv.http.openai_schemas import OpenAIErrorDetail, OpenAIErrorResponse
from lorasrv.http.schemas import ErrorDetail, ErrorResponse

#: aiohttp's own HTTP errors (routing, body size) -> the `type` field of our error body
HTTP_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}

#: HTTP status -> the `type` OpenAI gives its errors (the openai client picks its class by status)
OPENAI_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
OPENAI_PREFIX: Final = "/v1/"


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


def error_body(exc: LorasrvError) -> ErrorResponse:
    return ErrorResponse(error=ErrorDetail(message=exc.detail, type=exc.code, code=exc.status))


def openai_error_body(message: str, status: int, code: str | None) -> OpenAIErrorResponse:
    error_type = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "api_error")
    return OpenAIErrorResponse(error=OpenAIErrorDetail(message=message, type=error_type, code=code))


def error_response(
    exc: LorasrvError, headers: dict[str, str] | None = None, *, openai: bool = False
) -> web.Response:
    body: ErrorResponse | OpenAIErrorResponse = (
        openai_error_body(exc.detail, exc.status, exc.code) if openai else error_body(exc)
    )
    response = json_response(body, status=exc.status)
    if headers:
        response.headers.update(headers)
    return response


def http_error_response(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's 404/405/413...: keep the status (and `Allow`), answer in our JSON shape."""
    error_type = HTTP_ERROR_TYPES.get(exc.status, "http_error")
    if exc.status == 404:
        message = f"no route {request.path}"
    elif exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
    elif exc.text and not exc.text.startswith(f"{exc.status}:"):
        message = exc.text  # e.g. the body size limit
    else:
        message = exc.reason
    body: ErrorResponse | OpenAIErrorResponse
    if is_openai_path(request.path):
        body = openai_error_body(message, exc.status, error_type)
    else:
        body = ErrorResponse(error=ErrorDetail(message=message, type=error_type, code=exc.status))
    response = json_response(body, status=exc.status)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response
