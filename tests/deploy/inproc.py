"""The Ray deployment's parts without Ray: replica cores (real Engines on FakeRunner) and the
registry in this process, reached the way Ray reaches them (`x.method.remote(...)`), behind a
RoutedEngine and lorasrv's own HTTP app. Routing here is a stand-in for Ray Serve's: an adapter
sticks to the replica that first served it; base requests take turns.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import NamedTuple

from aiohttp import web

from lorasrv.config import ServerConfig
from lorasrv.deploy.ray.ingress import RoutedEngine
from lorasrv.deploy.ray.protocol import ReplicaInfo, Tagged
from lorasrv.deploy.ray.registry import AdapterRegistry
from lorasrv.deploy.ray.replica_core import ReplicaCore
from lorasrv.engine.requests import Submission
from lorasrv.http.app import build_app, make_runner
from tests.http.real_server import fake_engine


class InProcessActor:
    """`handle.method.remote(*args)` on a local object, as a Ray actor handle is called."""

    def __init__(self, target: object) -> None:
        self.target = target

    def __getattr__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(remote=getattr(self.target, name))


class ReplicaGone(Exception):
    """What the stand-in raises for a call to a killed replica (Ray: ActorDiedError)."""


class InProcessReplicas:
    """A ReplicaClient over local cores."""

    def __init__(self, cores: list[ReplicaCore]) -> None:
        self.cores = cores
        self.owner: dict[str, int] = {}
        self.dead: set[int] = set()
        self.calls: list[tuple[str | None, int, int]] = []  # (adapter, replica, submissions)
        self._turn = itertools.count()

    def route(self, lora_name: str | None) -> int:
        live = [i for i in range(len(self.cores)) if i not in self.dead]
        if lora_name is not None and self.owner.get(lora_name) in live:
            return self.owner[lora_name]
        index = live[next(self._turn) % len(live)]
        if lora_name is not None:
            self.owner[lora_name] = index
        return index

    async def call(
        self, lora_name: str | None, subs: list[Submission], stream: bool
    ) -> AsyncIterator[list[Tagged]]:
        index = self.route(lora_name)
        self.calls.append((lora_name, index, len(subs)))
        core = self.cores[index]
        if stream:
            async for chunk in core.stream(subs):
                yield chunk
        else:
            outputs = await core.collect(subs)
            yield [(i, out) for i, outs in enumerate(outputs) for out in outs]

    async def warm(self, lora_name: str) -> tuple[str, str] | None:
        return await self.cores[self.route(lora_name)].warm(lora_name)

    async def info(self) -> ReplicaInfo:
        return self.cores[0].info()

    def is_replica_gone(self, exc: BaseException) -> bool:
        return isinstance(exc, ReplicaGone)

    def is_overloaded(self, exc: BaseException) -> bool:
        return False


def core(config: ServerConfig, registry: AdapterRegistry, replica_id: str) -> ReplicaCore:
    """A replica over the real Engine on FakeRunner, with adapters a and b (tests/http's)."""
    return ReplicaCore(
        config, InProcessActor(registry), replica_id=replica_id, make_engine=fake_engine
    )


class Routed(NamedTuple):
    url: str
    engine: RoutedEngine
    replicas: InProcessReplicas
    registry: AdapterRegistry


@contextlib.asynccontextmanager
async def routed_server(config: ServerConfig, num_replicas: int = 2) -> AsyncIterator[Routed]:
    registry = AdapterRegistry()
    cores = [core(config, registry, f"r{i}") for i in range(num_replicas)]
    for replica in cores:
        await replica.start()
    replicas = InProcessReplicas(cores)
    engine = RoutedEngine(config, replicas, InProcessActor(registry))
    runner = make_runner(build_app(config, engine), access_log=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield Routed(f"http://{host}:{port}", engine, replicas, registry)
    finally:
        await runner.cleanup()
        for replica in replicas.cores:
            await replica.stop()
