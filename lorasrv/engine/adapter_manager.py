"""AdapterManagerActor: owns the AdapterRegistry (names, versions, host copies); turns its
effects into messages and host loads.

Thin by design: every rule lives in `adapter_registry`. Adapter files load off the event loop
(`asyncio.to_thread`); this module never touches torch or the GPU, and GPU residency is the
scheduler's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import assert_never

from lorasrv.config import AdapterConfig
from lorasrv.engine import invariants
from lorasrv.engine.actor import Actor, Sender
from lorasrv.engine.adapter_registry import AdapterRegistry, Effect, StartHostLoad
from lorasrv.engine.lora_spec import PeftLike, check_compatible
from lorasrv.engine.outputs import OpSink
from lorasrv.ids import AdapterId
from lorasrv.messages import (
    AcquireAdapter,
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterInbox,
    AdapterOpDone,
    AdapterRetired,
    DescribeAdapters,
    HostCopy,
    HostCopyDropped,
    HostCopyReady,
    HostLoadDone,
    LoadAdapter,
    ReleaseAdapter,
    RunnerInbox,
    SchedulerInbox,
    UnloadAdapter,
)

logger = logging.getLogger(__name__)


class AdapterManagerActor(Actor[AdapterInbox]):
    name = "adapters"

    def __init__(
        self,
        *,
        cfg: AdapterConfig,
        capacity: int,
        max_rank: int,
        target_modules: tuple[str, ...],
        read_config: Callable[[str], PeftLike],
        load_weights: Callable[[str], object],
        scheduler: Sender[SchedulerInbox],
        runner: Sender[RunnerInbox],
        ops: OpSink,
    ) -> None:
        super().__init__()
        self._registry = AdapterRegistry(cfg, capacity=capacity)
        self._max_rank = max_rank
        self._target_modules = target_modules
        self._read_config = read_config
        self._load_weights = load_weights
        self._scheduler = scheduler
        self._runner = runner
        self._ops = ops
        self._loads: set[asyncio.Task[None]] = set()  # strong refs: the loop keeps weak ones

    @property
    def registry(self) -> AdapterRegistry:
        """Read-only view for tests and metrics; only this actor changes it."""
        return self._registry

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            for task in self._loads:
                task.cancel()

    def handle(self, msg: AdapterInbox) -> None:
        registry = self._registry
        match msg:
            case AcquireAdapter():
                effects = registry.acquire(msg.request_id, msg.lora_name)
            case ReleaseAdapter():
                effects = registry.release(msg.request_id, msg.adapter_id)
            case LoadAdapter():
                logger.info("loading adapter %r from %r", msg.lora_name, msg.lora_path)
                effects = registry.begin_load(msg.op_id, msg.lora_name, msg.lora_path, msg.pinned)
            case UnloadAdapter():
                logger.info("unloading adapter %r", msg.lora_name)
                effects = registry.unload(msg.op_id, msg.lora_name)
            case DescribeAdapters():
                effects = [self._describe(msg)]
            case HostLoadDone():
                effects = self._on_host_load(msg)
            case _:
                assert_never(msg)
        self._apply(effects)
        if invariants.enabled:
            registry.check_invariants()

    def _describe(self, msg: DescribeAdapters) -> AdapterOpDone:
        everything = msg.names is None
        return AdapterOpDone(
            op_id=msg.op_id,
            success=True,
            loaded_adapters=self._registry.loaded_adapters() if everything else {},
            adapters=self._registry.describe(msg.names),
        )

    def _on_host_load(self, msg: HostLoadDone) -> list[Effect]:
        if msg.error is not None:
            logger.warning("adapter id %d failed to load: %s", msg.adapter_id, msg.error)
            return self._registry.fail_load(msg.adapter_id, msg.error)
        copy = msg.copy
        assert copy is not None, "HostLoadDone without a copy or an error"
        logger.info(
            "adapter id %d loaded to host in %.3f s (rank %d)",
            msg.adapter_id,
            copy.load_s,
            copy.rank,
        )
        return self._registry.finish_load(msg.adapter_id, copy)

    def _apply(self, effects: list[Effect]) -> None:
        """Carry out the registry's effects in order (uploads before the step's reply)."""
        for effect in effects:
            match effect:
                case HostCopyReady() | HostCopyDropped():
                    self._runner.send(effect)
                case AdapterAcquired() | AdapterAcquireFailed() | AdapterRetired():
                    self._scheduler.send(effect)
                case AdapterOpDone():
                    self._ops.op_done(effect)
                case StartHostLoad():
                    task = asyncio.create_task(
                        self._host_load(effect.adapter_id, effect.path),
                        name=f"adapter-load-{effect.adapter_id}",
                    )
                    self._loads.add(task)
                    task.add_done_callback(self._loads.discard)
                case _:
                    assert_never(effect)

    async def _host_load(self, adapter_id: AdapterId, path: str) -> None:
        """Load off the event loop; whatever happens, the actor hears back exactly once."""
        try:
            copy = await asyncio.to_thread(self._load_to_host, path)
        except (ValueError, OSError) as exc:
            self.send(HostLoadDone(adapter_id=adapter_id, error=str(exc)))
        except Exception as exc:  # a bug in a loader must not kill the actor nor leak the entry
            logger.exception("adapter id %d: unexpected error loading %r", adapter_id, path)
            self.send(HostLoadDone(adapter_id=adapter_id, error=f"{type(exc).__name__}: {exc}"))
        else:
            self.send(HostLoadDone(adapter_id=adapter_id, copy=copy))

    def _load_to_host(self, path: str) -> HostCopy:
        """Runs in a worker thread: read and check the config, then the weights."""
        start_s = time.monotonic()
        peft = self._read_config(path)
        check_compatible(
            peft.max_rank,
            peft.target_modules,
            max_rank=self._max_rank,
            target_modules=self._target_modules,
        )
        weights = self._load_weights(peft.path)
        rank, scaling = copy_rank(weights, peft)
        return HostCopy(
            weights=weights, rank=rank, scaling=scaling, load_s=time.monotonic() - start_s
        )


def copy_rank(weights: object, peft: PeftLike) -> tuple[int, float]:
    """Rows and scaling of a host copy: its own (the rank of the tensors it holds, the scaling
    its B was folded for) when the loader says, else the config's. A config's `r` may exceed
    every tensor's rank (rank_pattern): rows reserved from it would be zeros, uploaded and read
    by the kernels for nothing."""
    rank, scaling = getattr(weights, "rank", None), getattr(weights, "scaling", None)
    if isinstance(rank, int) and rank > 0 and isinstance(scaling, int | float):
        return rank, float(scaling)
    return peft.max_rank, peft.scaling
