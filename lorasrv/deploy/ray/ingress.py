"""RoutedEngine: an Engine whose requests and adapters live in the replicas. `build_app(config,
RoutedEngine(...))` is then the same app as `python -m lorasrv`: parsing, checks, result building
and error bodies are the HTTP layer's and the engine's own, so the wire format cannot drift.

Owns the ingress's view of the deployment (replica reports, refreshed twice a second) and the
dispatcher; adapters live in the registry, requests in the replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Final, Protocol

import msgspec

from lorasrv.config import ServerConfig
from lorasrv.deploy.ray.deployment_view import DeploymentMetrics, adapter_statuses, summed_stats
from lorasrv.deploy.ray.dispatch import Dispatcher, ReplicaCall
from lorasrv.deploy.ray.protocol import ReplicaInfo, ReplicaReport, Snapshot, Tagged
from lorasrv.engine import adapter_admin as admin
from lorasrv.engine.engine import Engine
from lorasrv.engine.request_handle import RequestHandle
from lorasrv.engine.requests import Submission
from lorasrv.engine.results import RequestResult
from lorasrv.engine.validation import check_submission
from lorasrv.errors import AdapterError, AdapterNotFound, BadRequest, EngineDead, error_for_code
from lorasrv.ids import OpId, RequestId
from lorasrv.messages import AdapterOpDone, AdapterStatus, RequestOutput

log = logging.getLogger(__name__)

REFRESH_S: Final = 0.5


class ReplicaClient(Protocol):
    """How the ingress reaches replicas (Ray Serve handles; in-process cores in tests)."""

    def call(
        self, lora_name: str | None, subs: list[Submission], stream: bool
    ) -> AsyncIterator[list[Tagged]]: ...

    async def warm(self, lora_name: str) -> tuple[str, str] | None: ...

    async def info(self) -> ReplicaInfo: ...

    def is_replica_gone(self, exc: BaseException) -> bool: ...

    def is_overloaded(self, exc: BaseException) -> bool: ...


class RoutedEngine(Engine):
    """The Engine surface (start/stop, submit, generate, adapters, facts) over the replicas.

    NOTE: an Engine subclass so the HTTP app takes it as it is; it starts no actors of its own,
    and every Engine method that would reach them is overridden here.
    """

    def __init__(self, config: ServerConfig, client: ReplicaClient, registry: Any) -> None:
        super().__init__(config)
        self._client = client
        self._registry = registry  # the registry actor's handle (calls go through `.remote`)
        self._reports: list[ReplicaReport] = []
        self.metrics: DeploymentMetrics = DeploymentMetrics(lambda: self._reports)
        call: ReplicaCall = client.call
        self._dispatch = Dispatcher(
            call,
            is_replica_gone=client.is_replica_gone,
            is_overloaded=client.is_overloaded,
            on_resend=self.metrics.resent.inc,
        )
        self._refresher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        info = await self._client.info()
        # The replicas' config as their model resolved it (the demo fills in paths and
        # names); this process's own HTTP settings stay.
        self.config = msgspec.structs.replace(info.config, http=self.config.http)
        self.model_path = info.model_path
        self._ready = info.ready
        self._tokenizer = info.tokenizer  # the replicas' own, pickled: same ids, same text
        await self._refresh()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="lorasrv-reports")
        self.started_s = time.time()

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await self._dispatch.close()

    async def _refresh(self) -> None:
        self._reports = await self._registry.replicas.remote()
        self.last_stats = summed_stats(self._reports)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self._refresh()
            except Exception:  # the registry briefly unreachable: keep the last view
                log.exception("cannot read replica reports")

    def is_healthy(self) -> bool:
        return self._ready is not None and any(report.healthy for report in self._reports)

    @property
    def reports(self) -> list[ReplicaReport]:
        """The live replicas' latest heartbeats."""
        return list(self._reports)

    # ------------------------------------------------------------------ requests

    def submit(self, submission: Submission, *, stream: bool = True) -> RequestHandle:
        """As `Engine.submit`; the request runs on the replica its adapter routes to. With
        `stream=False` its outputs come back at the end, in one transfer, and the request can be
        sent again whole if its replica dies first."""
        if self._ready is None:
            raise EngineDead("the deployment has not started")
        check_submission(submission, self.limits)
        rid = submission.request_id or uuid.uuid4().hex
        if self._dispatch.in_flight(rid):
            raise BadRequest(f"request id {rid!r} is already in use")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        named = msgspec.structs.replace(submission, request_id=rid)
        self._dispatch.submit(named, queue, stream)
        tracker = self.metrics.track(rid, submission.lora_name)
        return RequestHandle(self, RequestId(rid), queue, tracker)

    async def generate(self, submission: Submission) -> RequestResult:
        return await self.submit(submission, stream=False).result()

    def request_ids(self) -> tuple[str, ...]:
        return self._dispatch.request_ids()

    def abort(self, request_id: str) -> None:
        self._dispatch.abort(request_id)

    def forget(self, request_id: RequestId) -> None:
        self._dispatch.forget(request_id)

    # ------------------------------------------------------------------ adapters

    async def load_adapter(
        self, lora_name: str, lora_path: str, pinned: bool = False, *, replace: bool = False
    ) -> AdapterOpDone:
        """As `Engine.load_adapter`, for the deployment: register it, load it on the replica it
        routes to (which proves it loads there), then wait until every live replica has applied
        the change (pinned: loaded on each). A refusal anywhere undoes the registration."""
        admin.check_load_names(lora_name, lora_path)
        if not replace:
            admin.check_not_loaded(lora_name, admin.live_adapters(await self.describe_adapters()))
        registry = self._registry
        problem, version, previous = await registry.register.remote(
            lora_name, lora_path, pinned, replace
        )
        if problem is not None:  # registered by someone else since the check
            raise AdapterError(problem)
        refusal = await self._client.warm(lora_name)
        if refusal is None:
            failures = await registry.wait_applied.remote(version, frozenset({lora_name}))
            refusal = ("adapter_error", "; ".join(failures)) if failures else None
        if refusal is not None:
            undone = await registry.restore.remote(lora_name, previous)
            await registry.wait_applied.remote(undone, frozenset())
            await self._refresh()
            raise error_for_code(*refusal)
        return await self._answer()

    async def unload_adapter(self, lora_name: str) -> AdapterOpDone:
        """Unregister, then wait until every replica has dropped it (running requests finish)."""
        admin.check_loaded(lora_name, admin.live_adapters(await self.describe_adapters()))
        problem, version = await self._registry.unregister.remote(lora_name)
        if problem is not None:  # unloaded by someone else since the check
            raise AdapterNotFound(problem)
        failures = await self._registry.wait_applied.remote(version, frozenset({lora_name}))
        if failures:
            await self._refresh()
            raise AdapterError("; ".join(failures))
        return await self._answer()

    async def _answer(self) -> AdapterOpDone:
        await self._refresh()  # the replicas' reports as of the change, for the next answers
        snapshot: Snapshot = await self._registry.snapshot.remote()
        loaded = {name: entry.path for name, entry in snapshot.entries.items()}
        return AdapterOpDone(op_id=OpId(0), success=True, loaded_adapters=loaded)

    async def describe_adapters(
        self, names: tuple[str, ...] | None = None
    ) -> tuple[AdapterStatus, ...]:
        snapshot: Snapshot = await self._registry.snapshot.remote()
        statuses = adapter_statuses(snapshot.entries.values(), self._reports)
        return statuses if names is None else tuple(s for s in statuses if s.name in names)
