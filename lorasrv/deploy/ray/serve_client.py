"""The ingress's way to the replicas over Ray Serve: deployment-handle calls, each carrying its
adapter as the multiplexed model id, so Ray Serve routes it to a replica that holds the adapter
(while that replica has capacity; else to the one holding the fewest). Base-model calls go anywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from lorasrv.deploy.ray.protocol import ReplicaInfo, Tagged
from lorasrv.engine.requests import Submission


class ServeClient:
    def __init__(self, handle: DeploymentHandle[Any]) -> None:
        self._handle = handle

    def _routed(self, lora_name: str | None) -> DeploymentHandle[Any]:
        return self._handle.options(multiplexed_model_id=lora_name or "")

    async def call(
        self, lora_name: str | None, subs: list[Submission], stream: bool
    ) -> AsyncIterator[list[Tagged]]:
        if stream:
            streamed = self._routed(lora_name).options(stream=True)
            chunks = cast(DeploymentResponseGenerator[list[Tagged]], streamed.run.remote(subs))
            done = False
            try:
                async for chunk in chunks:
                    yield chunk
                done = True
            finally:
                if not done:  # closed early (every request aborted): stop the replica's work
                    chunks.cancel()  # type: ignore[no-untyped-call]
            return
        response = self._routed(lora_name).collect.remote(subs)
        try:
            outputs = await response
        except asyncio.CancelledError:
            response.cancel()  # type: ignore[no-untyped-call]
            raise
        yield [(index, out) for index, outs in enumerate(outputs) for out in outs]

    async def warm(self, lora_name: str) -> tuple[str, str] | None:
        refusal: tuple[str, str] | None = await self._routed(lora_name).warm.remote()
        return refusal

    async def info(self) -> ReplicaInfo:
        info: ReplicaInfo = await self._handle.info.remote()
        return info

    def is_replica_gone(self, exc: BaseException) -> bool:
        """The replica process died or vanished; the request may be sent elsewhere."""
        gone = (RayActorError, ReplicaUnavailableError)
        return isinstance(exc, gone) or isinstance(getattr(exc, "cause", None), gone)

    def is_overloaded(self, exc: BaseException) -> bool:
        return isinstance(exc, BackPressureError)
