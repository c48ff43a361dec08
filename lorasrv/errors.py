"""The lorasrv error tree. Each class knows its HTTP status and a stable error code.

Actors never raise these across queues: they send `RequestFailed(code=..., detail=...)` and the
HTTP layer maps the code back to a status with `status_for_code`.
"""

from __future__ import annotations

from typing import ClassVar, Final


class LorasrvError(Exception):
    """Base class: `status` is the HTTP status, `code` a stable machine-readable string."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ConfigError(LorasrvError):
    """A bad setting at startup: the server refuses to start and names the setting."""

    status = 400
    code = "invalid_config"


class BadRequest(LorasrvError):
    status = 400
    code = "invalid_request"


class AdapterError(LorasrvError):
    """A load or unload that cannot be done (bad folder, rank beyond the pool, too many pinned)."""

    status = 400
    code = "adapter_error"


class Unauthorized(LorasrvError):
    status = 401
    code = "unauthorized"


class AdapterNotFound(LorasrvError):
    status = 404
    code = "adapter_not_found"


class ModelNotFound(LorasrvError):
    status = 404
    code = "model_not_found"


class PromptTooLong(LorasrvError):
    status = 413
    code = "prompt_too_long"


class Overloaded(LorasrvError):
    status = 503
    code = "overloaded"


class EngineDead(LorasrvError):
    status = 503
    code = "engine_dead"


class ShuttingDown(LorasrvError):
    """The server is stopping: it takes no new requests, and ends the last ones at its timeout."""

    status = 503
    code = "shutting_down"


class AdapterUnavailable(LorasrvError):
    """A registered adapter could not be brought back into memory this time; retrying may work."""

    status = 503
    code = "adapter_unavailable"


class BatchTooLarge(LorasrvError):
    """More requests in one call than the server ever holds in flight: it can never run."""

    status = 413
    code = "batch_too_large"


_BY_CODE: Final[dict[str, type[LorasrvError]]] = {
    cls.code: cls
    for cls in (
        LorasrvError,
        ConfigError,
        BadRequest,
        AdapterError,
        Unauthorized,
        AdapterNotFound,
        ModelNotFound,
        PromptTooLong,
        Overloaded,
        EngineDead,
        ShuttingDown,
        AdapterUnavailable,
        BatchTooLarge,
    )
}


def error_for_code(code: str, detail: str) -> LorasrvError:
    """Rebuild the exception a `RequestFailed(code, detail)` message stands for."""
    return _BY_CODE.get(code, LorasrvError)(detail)


def status_for_code(code: str) -> int:
    return _BY_CODE.get(code, LorasrvError).status
