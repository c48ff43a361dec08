"""many_sim.py's engine in virtual time: the real SchedulerActor and AdapterRegistry driven
message by message (as their actors would be), a runner whose steps and uploads take the cost
model's time, host loads on a few workers. No torch, no asyncio loop.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import many_sim_model as model

from lorasrv.config import AdapterConfig, SchedulerConfig
from lorasrv.engine.adapter_registry import AdapterRegistry, StartHostLoad
from lorasrv.engine.planner import effective_capacity
from lorasrv.engine.scheduler import SchedulerActor
from lorasrv.ids import AdapterId, OpId, RequestId
from lorasrv.messages import (
    AcquireAdapter,
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterOpDone,
    AdapterRetired,
    EmitTokens,
    Enqueue,
    HostCopy,
    HostCopyDropped,
    HostCopyReady,
    HostLoadDone,
    ReleaseAdapter,
    RequestFailed,
    RunStep,
    SamplingParams,
    StepDone,
    StepPlan,
    StepResult,
)


class Scenario(NamedTuple):
    """One engine of bench_many.py: its adapters and flags."""

    names: tuple[str, ...]
    ranks: tuple[int, ...]  # per name
    targets: tuple[str, ...]
    max_rank: int
    cap: int | None = None  # --max-loras-per-batch
    max_loaded: int | None = None  # --max-loaded-loras
    popularity: str = "zipf"  # zipf | uniform | base
    arena_gib: float = 50.0  # an H100's, after 16 GB of weights


class Clock:
    """Virtual time: callbacks at times, in time order (ties in scheduling order)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(when, self.now), next(self._order), fn))

    def run(self, until: Callable[[], bool], limit_s: float = 3600.0) -> None:
        while self._heap and not until():
            self.now, _, fn = heapq.heappop(self._heap)
            if self.now > limit_s:
                raise RuntimeError(f"no end after {limit_s} virtual seconds")
            fn()


class Mailbox:
    """An actor's inbox in virtual time: messages that arrive together are handled together,
    then `after_batch` (as Actor.run does)."""

    def __init__(self, clock: Clock, handle: Callable[[Any], None],
                 after: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.clock, self.handle, self.after = clock, handle, after
        self.queue: deque[Any] = deque()

    def send(self, msg: Any, delay: float = 0.0) -> None:
        self.clock.at(self.clock.now + delay, lambda: self._arrive(msg))

    def _arrive(self, msg: Any) -> None:
        self.queue.append(msg)
        if len(self.queue) == 1:
            self.clock.at(self.clock.now, self._wake)

    def _wake(self) -> None:
        while self.queue:
            self.handle(self.queue.popleft())
        self.after()


class StepLog(NamedTuple):
    start_s: float
    end_s: float
    shape: model.StepShape
    num_uploads: int


class SimRunner:
    """The GPU runner: steps one plan at a time, uploads on a side stream (a step waits for its
    own adapters' uploads and every earlier plan's), each step's time from the cost model."""

    def __init__(self, clock: Clock, cost: model.CostModel, host: model.HostModel,
                 ready: Any) -> None:  # fmt: skip
        self.clock, self.cost, self.host_model, self.ready = clock, cost, host, ready
        self.scheduler: Mailbox | None = None
        self.host: dict[AdapterId, int] = {}  # host copies: rank
        self.ranks: dict[AdapterId, int] = {}
        self.plans: deque[StepPlan] = deque()
        self.busy = False
        self.upload_free_s = 0.0
        self.earlier_uploads_s = 0.0  # the last end of an earlier plan's upload
        self.steps: list[StepLog] = []
        self.num_uploads = 0

    def send(self, msg: Any, /) -> None:
        match msg:
            case HostCopyReady(adapter_id=a, rank=rank):
                self.host[a] = self.ranks[a] = rank
            case HostCopyDropped(adapter_id=a):
                del self.host[a]
            case RunStep(plan=plan):
                self.plans.append(plan)
                self._next()
            case _:
                raise AssertionError(f"runner got {msg!r}")

    def _next(self) -> None:
        if self.busy or not self.plans:
            return
        plan = self.plans.popleft()
        now = self.clock.now
        start = max(now, self.earlier_uploads_s)
        current: dict[AdapterId, float] = {}
        for up in plan.uploads:
            assert up.adapter_id in self.host, f"upload of {up.adapter_id}: no host copy"
            begin = max(now, self.upload_free_s)
            self.upload_free_s = begin + len(up.rows) * self.ready.lora_row_bytes / (
                self.host_model.upload_bytes_per_s
            )
            current[up.adapter_id] = self.upload_free_s
        self.num_uploads += len(plan.uploads)
        self.earlier_uploads_s = max([self.earlier_uploads_s, *current.values()])
        if not plan.seq_ids:
            self._next()
            return
        start = max([start, *(current.get(a.adapter_id, 0.0) for a in plan.adapters)])
        shape = step_shape(plan, self.ready.lora_row_bytes)
        end = start + self.cost.step_s(shape)
        self.steps.append(StepLog(now, end, shape, len(plan.uploads)))
        self.busy = True
        self.clock.at(end, lambda: self._done(plan))

    def _done(self, plan: StepPlan) -> None:
        self.busy = False
        sampled = tuple(s for s, is_s in zip(plan.seq_ids, plan.sample_rows, strict=True) if is_s)
        assert self.scheduler is not None
        result = StepResult(token_ids=(1,) * len(sampled))
        self.scheduler.send(StepDone(step_id=plan.step_id, seq_ids=sampled, result=result))
        self._next()


def step_shape(plan: StepPlan, lora_row_bytes: int) -> model.StepShape:
    new = sum(plan.query_lens)
    return model.StepShape(
        is_decode=plan.is_decode,
        rows=len(plan.seq_ids),
        new_tokens=new,
        context_tokens=sum(plan.context_lens) + new,
        num_adapters=len(plan.adapters),
        adapter_bytes=lora_row_bytes * sum(len(a.rows) for a in plan.adapters),
    )


class SimAdapters:
    """The AdapterManagerActor: the real AdapterRegistry's rules; host loads take `load_s` each
    on `load_workers` workers."""

    def __init__(self, clock: Clock, registry: AdapterRegistry, host: model.HostModel,
                 paths: dict[str, int]) -> None:  # fmt: skip
        self.clock, self.registry, self.host_model = clock, registry, host
        self.rank_of_path = {f"/adapters/{name}": rank for name, rank in paths.items()}
        self.runner: SimRunner | None = None
        self.scheduler: Mailbox | None = None
        self.mailbox = Mailbox(clock, self.handle)
        self.workers_free = [0.0] * host.load_workers
        self.num_loads = 0

    def send(self, msg: Any, /) -> None:
        self.mailbox.send(msg, self.host_model.hop_s)

    def handle(self, msg: Any) -> None:
        match msg:
            case AcquireAdapter(request_id=rid, lora_name=name):
                self.apply(self.registry.acquire(rid, name))
            case ReleaseAdapter(request_id=rid, adapter_id=a):
                self.apply(self.registry.release(rid, a))
            case HostLoadDone(adapter_id=a, copy=copy):
                assert copy is not None
                self.apply(self.registry.finish_load(a, copy))
            case _:
                raise AssertionError(f"adapter manager got {msg!r}")

    def register(self, names: tuple[str, ...]) -> None:
        """Every name loaded before the run (as bench_many.py's registration), in order."""
        for i, name in enumerate(names):
            effects = self.registry.begin_load(OpId(i), name, f"/adapters/{name}", False)
            for effect in effects:
                assert isinstance(effect, StartHostLoad), effect
                self.apply(self.registry.finish_load(effect.adapter_id, self._copy(effect.path)))

    def apply(self, effects: list[Any]) -> None:
        assert self.runner is not None
        assert self.scheduler is not None
        for effect in effects:
            match effect:
                case HostCopyReady() | HostCopyDropped():
                    self.runner.send(effect)
                case AdapterAcquired() | AdapterAcquireFailed() | AdapterRetired():
                    self.scheduler.send(effect, self.host_model.hop_s)
                case AdapterOpDone():
                    pass
                case StartHostLoad(adapter_id=a, path=path):
                    self._start_load(a, path)
                case _:
                    raise AssertionError(f"effect {effect!r}")

    def _start_load(self, adapter_id: AdapterId, path: str) -> None:
        self.num_loads += 1
        worker = min(range(len(self.workers_free)), key=self.workers_free.__getitem__)
        done = max(self.clock.now, self.workers_free[worker]) + self.host_model.load_s
        self.workers_free[worker] = done
        msg = HostLoadDone(adapter_id=adapter_id, copy=self._copy(path))
        self.clock.at(done, lambda: self.mailbox.send(msg))

    def _copy(self, path: str) -> HostCopy:
        rank = self.rank_of_path[path]
        return HostCopy(weights=rank, rank=rank, scaling=1.0, load_s=self.host_model.load_s)


class SimEngine:
    """The scheduler, runner and adapter manager of one engine, wired as wiring.py does."""

    def __init__(self, scenario: Scenario, cost: model.CostModel, host: model.HostModel,
                 on_output: Callable[[Any], None]) -> None:  # fmt: skip
        self.clock = Clock()
        self.ready = model.h100_ready(scenario.targets, scenario.max_rank,
                                      arena_bytes=int(scenario.arena_gib * model.GIB))  # fmt: skip
        adapter_cfg = AdapterConfig(enable_lora=True, max_loras_per_batch=scenario.cap,
                                    max_loaded_loras=scenario.max_loaded,
                                    max_lora_rank=scenario.max_rank)  # fmt: skip
        capacity = effective_capacity(self.ready, scenario.cap)
        self.runner = SimRunner(self.clock, cost, host, self.ready)
        ranks = dict(zip(scenario.names, scenario.ranks, strict=True))
        registry = AdapterRegistry(adapter_cfg, capacity=capacity)
        self.adapters = SimAdapters(self.clock, registry, host, ranks)
        self.tokenizer = _Outputs(self.clock, host.hop_s, on_output)
        self.scheduler = SchedulerActor(
            cfg=SchedulerConfig(), adapter_cfg=adapter_cfg, ready=self.ready,
            tokenizer=self.tokenizer, adapters=self.adapters, runner=self.runner,
        )  # fmt: skip
        self.mailbox = Mailbox(self.clock, self.scheduler.handle, self.scheduler.after_batch)
        self.runner.scheduler = self.adapters.scheduler = self.mailbox
        self.adapters.runner = self.runner
        self.adapters.register(scenario.names)

    def submit(self, request_id: str, prompt: tuple[int, ...], lora: str | None,
               new_tokens: int) -> None:  # fmt: skip
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        msg = Enqueue(request_id=RequestId(request_id), prompt_ids=prompt, lora_name=lora,
                      params=params)  # fmt: skip
        self.mailbox.send(msg, 2 * self.adapters.host_model.hop_s)  # client -> tokenizer -> here

    def is_resident(self, lora: str) -> bool:
        version = self.adapters.registry.catalog.by_name.get(lora)
        return version is not None and self.scheduler.planner.residency.is_resident(
            version.adapter_id
        )


class _Outputs:
    """The tokenizer actor and the client's stream: each output reaches the client a hop later."""

    def __init__(self, clock: Clock, hop_s: float, on_output: Callable[[Any], None]) -> None:
        self.clock, self.hop_s, self.on_output = clock, hop_s, on_output

    def send(self, msg: Any, /) -> None:
        assert isinstance(msg, EmitTokens | RequestFailed), msg
        self.clock.at(self.clock.now + self.hop_s, lambda: self.on_output(msg))
