"""The Ray Serve deployment: one lorasrv Engine per replica (its GPUs, `--tp-size` inside it).

The adapter a request group names is its multiplexed model id; loading it goes through
`serve.multiplexed`, so Ray Serve learns which replica holds which adapter and routes to it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from lorasrv.config import ServerConfig
from lorasrv.deploy.ray.protocol import ReplicaInfo, Tagged
from lorasrv.deploy.ray.replica_core import EngineFactory, ReplicaCore
from lorasrv.engine.engine import Engine
from lorasrv.engine.requests import Submission
from lorasrv.messages import RequestOutput

log = logging.getLogger(__name__)


class LorasrvReplica:
    """Deployed with `serve.deployment(LorasrvReplica).options(...)` by `app.py`."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async __init__
        self,
        config: ServerConfig,
        registry: Any,
        max_adapters: int,
        make_engine: EngineFactory = Engine,
    ) -> None:
        context = serve.get_replica_context()
        self._core = ReplicaCore(
            config, registry, replica_id=context.replica_id.unique_id, make_engine=make_engine
        )

        async def load_adapter(name: str) -> str:
            await self._core.claim(name)
            return name  # the engine holds the weights; Ray keeps the name for routing

        # NOTE: evicting a name from Ray's cache only changes where its requests are routed;
        # the engine keeps the adapter (its own LRU frees memory), so nothing racing a request
        # is ever unloaded behind its back.
        self._adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter)
        await self._core.start()

    async def _claim(self, name: str) -> None:
        await self._adapter(name)

    async def run(self, subs: list[Submission]) -> AsyncIterator[list[Tagged]]:
        """Streamed: a group of one adapter's submissions, deltas as they come."""
        async for chunk in self._core.stream(subs, self._claim):
            yield chunk

    async def collect(self, subs: list[Submission]) -> list[list[RequestOutput]]:
        """The same group, answered once at the end (non-streaming requests)."""
        return await self._core.collect(subs, self._claim)

    async def warm(self) -> tuple[str, str] | None:
        """Load the request's adapter now (an admin load proves it here): None, or the refusal
        as (error code, detail)."""
        return await self._core.warm(serve.get_multiplexed_model_id(), self._claim)

    async def info(self) -> ReplicaInfo:
        return self._core.info()

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine has died."""
        self._core.check_health()

    async def __del__(self) -> None:
        await self._core.stop()
