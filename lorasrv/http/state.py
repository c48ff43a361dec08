"""The Engine surface the HTTP layer relies on (`EngineLike`) and the app's typed state keys.

Structural only: `lorasrv.engine.engine.Engine` and `tests/http/fake_engine.FakeEngine` both fit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, Self

from aiohttp import web

from lorasrv.config import ServerConfig
from lorasrv.engine.stats import SchedulerStats
from lorasrv.messages import (
    AdapterOpDone,
    AdapterStatus,
    ChatMessage,
    RequestOutput,
    SamplingParams,
)
from lorasrv.metrics import Metrics

SamplingArg = dict[str, Any] | list[dict[str, Any]] | None
GenerateResult = dict[str, Any] | list[dict[str, Any]]


class RequestHandleLike(Protocol):
    """`Engine.submit`'s answer: output deltas of one request; `abort()` frees it early."""

    @property
    def request_id(self) -> str: ...

    def __aiter__(self) -> Self: ...

    async def __anext__(self) -> RequestOutput: ...

    def abort(self) -> None: ...


class EngineLike(Protocol):
    @property
    def served_model_name(self) -> str: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def last_stats(self) -> SchedulerStats: ...

    def is_healthy(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def generate(
        self,
        *,
        text: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        sampling_params: SamplingArg = None,
        lora_path: str | list[str | None] | None = None,
        rid: str | list[str] | None = None,
    ) -> GenerateResult: ...

    def stream(
        self,
        *,
        text: str | None = None,
        input_ids: list[int] | None = None,
        sampling_params: dict[str, Any] | None = None,
        lora_path: str | None = None,
        rid: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]: ...

    def submit(
        self,
        *,
        params: SamplingParams,
        text: str | None = None,
        input_ids: list[int] | tuple[int, ...] | None = None,
        messages: list[ChatMessage] | tuple[ChatMessage, ...] | None = None,
        lora_name: str | None = None,
        request_id: str | None = None,
    ) -> RequestHandleLike: ...

    def decode_tokens(self, ids: Sequence[int]) -> list[str]: ...

    async def load_adapter(
        self, lora_name: str, lora_path: str, pinned: bool = False
    ) -> AdapterOpDone: ...

    async def unload_adapter(self, lora_name: str) -> AdapterOpDone: ...

    async def describe_adapters(self) -> tuple[AdapterStatus, ...]: ...

    def model_info(self) -> dict[str, Any]: ...

    async def server_info(self) -> dict[str, Any]: ...


ENGINE_KEY = web.AppKey("engine", EngineLike)
CONFIG_KEY = web.AppKey("config", ServerConfig)
CREATED_KEY = web.AppKey("created", int)  # unix time the app was built: /v1/models "created"
