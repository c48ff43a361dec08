"""Engine: wires and supervises the actors; the typed API (submit / abort / generate,
load_adapter / unload_adapter) that http/ and embedding apps use. Owns the per-request output
queues; admin operations (adapters, cache flush) go through its AdminOps; speaks no wire format.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Self

from lorasrv.config import ServerConfig, build_config, lora_enabled
from lorasrv.engine.admin_ops import AdminOps
from lorasrv.engine.gpu_runner import GpuRunnerActor
from lorasrv.engine.hf_tokenizer import Detokenizer
from lorasrv.engine.parts import EngineParts, prepare_parts
from lorasrv.engine.request_handle import RequestHandle
from lorasrv.engine.requests import Submission
from lorasrv.engine.results import RequestResult
from lorasrv.engine.stats import SchedulerStats
from lorasrv.engine.tokenizer import TokenizerActor
from lorasrv.engine.validation import Limits, check_submission
from lorasrv.engine.wiring import Forward, wire_actors
from lorasrv.errors import (
    BadRequest,
    BatchTooLarge,
    ConfigError,
    EngineDead,
    LorasrvError,
    Overloaded,
    ShuttingDown,
)
from lorasrv.ids import RequestId
from lorasrv.messages import (
    Abort,
    AdapterOpDone,
    AdapterStatus,
    RequestOutput,
    RunnerReady,
    SchedulerInbox,
    Tokenize,
)
from lorasrv.metrics import Metrics

logger = logging.getLogger(__name__)


class Engine:
    """`async with Engine(config) as engine:` then submit / generate / load_adapter / ..."""

    def __init__(self, config: ServerConfig, *, parts: EngineParts | None = None) -> None:
        self.config = config
        self._parts = parts  # injected by tests (FakeRunner...); else built in start()
        self._outputs: dict[RequestId, asyncio.Queue[RequestOutput]] = {}
        self.admin = AdminOps(
            check_running=self._check_running,
            stats=lambda: self.last_stats,
        )
        self._supervisor: asyncio.Task[None] | None = None
        self._runner_actor: GpuRunnerActor | None = None
        self._tokenizer_actor: TokenizerActor | None = None
        self._ready: RunnerReady | None = None
        self.last_stats = SchedulerStats()  # the scheduler's latest snapshot
        # this engine's own Prometheus registry, served by /metrics
        self.metrics = Metrics(prefix_cache=not config.scheduler.disable_radix_cache)
        self._tokenizer: Detokenizer | None = None
        self.failed = asyncio.Event()
        self.failure: str | None = None
        self.draining: str | None = None  # why new work is refused: the server is stopping
        self.model_path = ""
        self.started_s = 0.0

    @classmethod
    def from_args(cls, **options: Any) -> Engine:
        """CLI option names in snake_case: `Engine.from_args(model_path=..., lora_paths=[...])`."""
        return cls(build_config(options))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        parts = self._parts or await prepare_parts(self.config)
        self.config = parts.config  # the demo model fills in model_path and adapters
        self.model_path = parts.model_path
        self._tokenizer = parts.tokenizer
        self.admin.read_adapter_config = parts.read_adapter_config
        self.admin.lora_enabled = lora_enabled(self.config.adapters)
        to_scheduler: Forward[SchedulerInbox] = Forward()  # the scheduler comes last
        runner = GpuRunnerActor(factory=parts.runner_factory, scheduler=to_scheduler)
        self._runner_actor = runner
        self._ready = self.admin.ready = ready = await runner.start_runner()
        try:
            wired = wire_actors(parts, self.config, runner, ready, to_scheduler, self, self.admin)
        except ConfigError:
            await self.stop()
            raise
        self._tokenizer_actor, capacity = wired.tokenizer, wired.capacity
        self.admin.adapters, self.admin.scheduler = wired.adapters, wired.scheduler
        actors = (wired.tokenizer, wired.scheduler, wired.adapters, runner)
        self._supervisor = asyncio.create_task(self._supervise(actors), name="lorasrv-actors")
        self.started_s = time.time()
        for ref in parts.initial_adapters:
            try:
                await self.load_adapter(ref.lora_name, ref.lora_path, ref.pinned)
            except LorasrvError as exc:
                await self.stop()
                raise LorasrvError(f"--lora-paths {ref.lora_name}: {exc.detail}") from None
        logger.info(
            "engine ready: %s on %s (%s), %d KV pages of %d tokens, %d LoRA rows, "
            "up to %d adapters per batch",
            self.model_path, ready.device, ready.dtype, ready.num_kv_pages, ready.page_size,
            ready.lora_max_rows, capacity,
        )  # fmt: skip

    async def _supervise(self, actors: tuple[Any, ...]) -> None:
        """An exception escaping an actor is a bug: stop everything and report unhealthy."""
        try:
            async with asyncio.TaskGroup() as group:
                for actor in actors:
                    group.create_task(actor.run(), name=f"lorasrv-{actor.name}")
        except* Exception as failure:
            logger.critical("engine actor crashed; stopping", exc_info=failure)
            self._die(f"engine actor crashed: {failure.exceptions[0]!r}")

    def _die(self, reason: str) -> None:
        self.failure = reason
        self.failed.set()
        for request_id, queue in list(self._outputs.items()):
            queue.put_nowait(_error_output(request_id, EngineDead(reason)))
        self.admin.fail_all(EngineDead(reason))

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
            self._supervisor = None
        if self._runner_actor is not None:
            await self._runner_actor.shutdown()
            self._runner_actor = None
        if not self.failed.is_set():
            self._die("engine stopped")

    def is_healthy(self) -> bool:
        """Running and taking requests (False while draining for a shutdown)."""
        return self._supervisor is not None and not self.failed.is_set() and self.draining is None

    def _check_running(self) -> None:
        if not self.is_healthy():
            raise self._refusal()

    def _refusal(self) -> LorasrvError:
        if self.draining is not None and not self.failed.is_set():
            return ShuttingDown(self.draining)
        return EngineDead(self.failure or "the engine is not running")

    def drain(self, reason: str) -> None:
        """Refuse new requests and adapter operations from now on (503 `reason`); requests in
        flight go on. For a server that is stopping."""
        self.draining = reason

    def end_requests(self, reason: str) -> None:
        """End every request in flight now: its reader gets a 503 error (a stream: an error event,
        then [DONE]), and its pages and adapter reference are freed."""
        for request_id in list(self._outputs):
            queue = self._outputs.pop(request_id)
            queue.put_nowait(_error_output(request_id, ShuttingDown(reason)))
            if self._tokenizer_actor is not None:
                self._tokenizer_actor.send(Abort(request_id=request_id))

    @property
    def ready_info(self) -> RunnerReady:
        if self._ready is None:
            raise EngineDead("the engine has not started")
        return self._ready

    @property
    def served_model_name(self) -> str:
        return self.config.model.served_model_name or self.model_path

    # ------------------------------------------------------------------ requests

    @property
    def limits(self) -> Limits:
        ready = self.ready_info
        return Limits(
            vocab_size=ready.vocab_size,
            context_length=ready.context_length,
            lora_enabled=lora_enabled(self.config.adapters),
            max_token_chars=self.tokenizer.max_token_chars,
        )

    def submit(self, submission: Submission) -> RequestHandle:
        """Check and enqueue one request; bad input raises a LorasrvError at once."""
        if not self.is_healthy() or self._tokenizer_actor is None:
            raise self._refusal()
        check_submission(submission, self.limits)
        if len(self._outputs) >= self._max_in_flight:
            raise Overloaded(f"{len(self._outputs)} requests in flight; try again later")
        rid = RequestId(submission.request_id or uuid.uuid4().hex)
        if rid in self._outputs:
            raise BadRequest(f"request id {rid!r} is already in use")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._outputs[rid] = queue
        input_ids = submission.input_ids
        messages = submission.messages
        self._tokenizer_actor.send(
            Tokenize(
                request_id=rid,
                text=submission.text,
                input_ids=tuple(input_ids) if input_ids is not None else None,
                messages=tuple(messages) if messages is not None else None,
                lora_name=submission.lora_name,
                params=submission.params,
            )
        )
        return RequestHandle(self, rid, queue, self.metrics.track(rid, submission.lora_name))

    async def generate(self, submission: Submission) -> RequestResult:
        """Submit and wait for the whole result; cancelling the wait aborts the request."""
        return await self.submit(submission).result()

    @property
    def _max_in_flight(self) -> int:
        cfg = self.config.scheduler
        return cfg.max_queued_requests + cfg.max_running_requests

    def check_batch_size(self, num_requests: int) -> None:
        """Refuse (413) a call of more requests than are ever in flight at once: it can never
        run, so it is not an overload to retry (a partial batch would be refused at once)."""
        limit = self._max_in_flight
        if num_requests > limit:
            cfg = self.config.scheduler
            raise BatchTooLarge(
                f"{num_requests} requests in one call; at most {limit} can be in flight "
                f"(--max-running-requests {cfg.max_running_requests} + --max-queued-requests "
                f"{cfg.max_queued_requests}): send smaller batches"
            )

    def request_ids(self) -> tuple[str, ...]:
        """The requests in flight (submitted, not yet finished or aborted)."""
        return tuple(self._outputs)

    def abort(self, request_id: str) -> None:
        """Free everything the request holds; its reader gets a last output with finish reason
        "abort". Unknown or finished ids are ignored."""
        rid = RequestId(request_id)
        queue = self._outputs.pop(rid, None)
        if queue is not None and self._tokenizer_actor is not None:
            queue.put_nowait(
                RequestOutput(
                    request_id=rid, text="", token_ids=(), finished=True, finish_reason="abort"
                )
            )
            self._tokenizer_actor.send(Abort(request_id=rid))

    def forget(self, request_id: RequestId) -> None:
        """A handle saw its request finish: drop the output queue (nothing left to abort)."""
        self._outputs.pop(request_id, None)

    # OutputSink / OpSink / StatsSink, called by actors on the event loop.
    def put_output(self, output: RequestOutput) -> None:
        queue = self._outputs.get(output.request_id)
        if queue is not None:
            queue.put_nowait(output)

    def scheduler_stats(self, stats: SchedulerStats) -> None:
        self.last_stats = stats

    async def flush_cache(self) -> int:
        """Drop every cached KV page no request uses (SGLang's /flush_cache); how many."""
        return await self.admin.flush_cache()

    # ------------------------------------------------------------------ adapters

    async def load_adapter(
        self, lora_name: str, lora_path: str, pinned: bool = False, *, replace: bool = False
    ) -> AdapterOpDone:
        """Load a PEFT folder (or Hub id) under `lora_name`; raises a LorasrvError if refused.

        `replace`: a loaded name gets a new version (a fresh adapter id): requests that hold the
        old one finish on it, later ones wait for the new one. Its folder is checked first, so a
        refused replacement leaves the old version serving.
        """
        return await self.admin.load(lora_name, lora_path, pinned, replace=replace)

    async def unload_adapter(self, lora_name: str) -> AdapterOpDone:
        """Stop new requests for the name; the version drains as its requests finish."""
        return await self.admin.unload(lora_name)

    async def describe_adapters(
        self, names: tuple[str, ...] | None = None
    ) -> tuple[AdapterStatus, ...]:
        """Every adapter version (with `names`: the live versions of those names only): the
        adapter manager's view, with its GPU rows and evictions from the scheduler's latest
        snapshot."""
        return await self.admin.describe(names)

    # ------------------------------------------------------------------ tokens

    @property
    def tokenizer(self) -> Detokenizer:
        """The model's tokenizer (encode, decode, chat template), for /tokenize and logprobs."""
        if self._tokenizer is None:
            raise EngineDead("the engine has not started")
        return self._tokenizer


def _error_output(request_id: RequestId, error: LorasrvError) -> RequestOutput:
    return RequestOutput(
        request_id=request_id,
        text="",
        token_ids=(),
        finished=True,
        finish_reason="error",
        error_code=error.code,
        error_detail=error.detail,
    )
