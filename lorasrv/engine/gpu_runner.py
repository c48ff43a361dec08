"""GpuRunnerActor: the one owner of the model. Runs the StepRunner on its own single thread so the
event loop never blocks on the GPU; the only engine module that imports `lorasrv.model`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, assert_never

from lorasrv.engine.actor import Actor, Sender
from lorasrv.engine.step_runner import StepRunner
from lorasrv.messages import (
    ClearSlot,
    LoadSlot,
    RunnerInbox,
    RunnerReady,
    RunStep,
    SchedulerInbox,
    StepDone,
)

if TYPE_CHECKING:
    from lorasrv.config import ServerConfig
    from lorasrv.engine.lora_spec import LoraPoolSpec

logger = logging.getLogger(__name__)


class GpuRunnerActor(Actor[RunnerInbox]):
    """Inbox order is execution order: slot uploads queued before a RunStep land before it."""

    name = "gpu_runner"

    def __init__(
        self, *, factory: Callable[[], StepRunner], scheduler: Sender[SchedulerInbox]
    ) -> None:
        super().__init__()
        self._factory = factory
        self._scheduler = scheduler
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasrv-gpu")
        self._runner: StepRunner | None = None

    @property
    def runner(self) -> StepRunner:
        assert self._runner is not None, "start_runner() first"
        return self._runner

    async def start_runner(self) -> RunnerReady:
        """Build the model on the runner thread (CUDA context included) and report what it has."""
        loop = asyncio.get_running_loop()
        self._runner = await loop.run_in_executor(self._executor, self._factory)
        return await loop.run_in_executor(self._executor, self._runner.ready)

    async def run(self) -> None:
        # A tensor-parallel runner also reports a failed worker while no step runs.
        on_failure = getattr(self.runner, "on_failure", None)
        if on_failure is None:
            await self._serve()
            return
        serve = asyncio.ensure_future(self._serve())
        failed = asyncio.ensure_future(_reported_failure(on_failure))
        try:
            await asyncio.wait((serve, failed), return_when=asyncio.FIRST_COMPLETED)
            for task in (failed, serve):
                if task.done():
                    task.result()  # raises: the engine's supervisor stops everything
        finally:
            serve.cancel()
            failed.cancel()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.inbox.get()]
            while not self.inbox.empty():
                batch.append(self.inbox.get_nowait())
            for done in await loop.run_in_executor(self._executor, self._execute, batch):
                self._scheduler.send(done)

    def _execute(self, batch: list[RunnerInbox]) -> list[StepDone]:
        """Runs on the runner thread, in inbox order."""
        runner = self.runner
        results: list[StepDone] = []
        for msg in batch:
            match msg:
                case LoadSlot(slot_id=slot_id, adapter_id=adapter_id, weights=weights):
                    runner.load_slot(slot_id, adapter_id, weights)
                case ClearSlot(slot_id=slot_id):
                    runner.clear_slot(slot_id)
                case RunStep(plan=plan):
                    started = time.perf_counter()
                    out = runner.step(plan)
                    if not plan.seq_ids:
                        continue  # only freed sequence state: nobody waits for an answer
                    sampled = tuple(
                        s
                        for s, is_sampled in zip(plan.seq_ids, plan.sample_rows, strict=True)
                        if is_sampled
                    )
                    results.append(
                        StepDone(
                            step_id=plan.step_id,
                            seq_ids=sampled,
                            token_ids=tuple(out.token_ids),
                            logprobs=tuple(out.logprobs),
                            top_logprobs=tuple(out.top_logprobs),
                            duration_s=time.perf_counter() - started,
                        )
                    )
                case _:
                    assert_never(msg)
        return results

    async def shutdown(self) -> None:
        if self._runner is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._runner.shutdown)
        self._executor.shutdown(wait=False, cancel_futures=True)


def model_runner_factory(
    config: ServerConfig, model_path: str, pool: LoraPoolSpec
) -> Callable[[], StepRunner]:
    """The real runner, built on the runner thread: lorasrv.model.runner.ModelRunner, or
    lorasrv.tp.runner.TpRunner with --tp-size > 1."""

    def build() -> StepRunner:
        from lorasrv.model.runner import ModelRunner

        model, cache = config.model, config.cache
        make: Callable[..., StepRunner] = ModelRunner
        if model.tp_size > 1:
            from lorasrv.tp.runner import TpRunner  # same keywords; one process per rank

            make = functools.partial(TpRunner, tp_size=model.tp_size)
        runner: StepRunner = make(
            model_path=model_path,
            dtype=model.dtype,
            device=model.device,
            revision=model.revision,
            context_length=model.context_length,
            page_size=cache.page_size,
            kv_cache_bytes=cache.kv_cache_bytes,
            num_kv_pages=cache.num_kv_pages,
            mem_fraction_static=cache.mem_fraction_static,
            enable_lora=pool.enabled,
            lora_max_rank=pool.max_rank,
            lora_target_modules=pool.target_modules,
            lora_backend=pool.backend,
            seed=model.seed,
            enable_cuda_graph=not model.disable_cuda_graph,
            allow_pickle=model.allow_pickle,
            enable_lookahead=not config.scheduler.disable_overlap_schedule,
        )
        return runner

    return build


async def _reported_failure(on_failure: Callable[[Callable[[str], None]], None]) -> None:
    """Raises once the runner reports a failure (from one of its own threads)."""
    loop = asyncio.get_running_loop()
    cause: asyncio.Future[str] = loop.create_future()

    def report(reason: str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody left to tell
            loop.call_soon_threadsafe(_resolve, cause, reason)

    on_failure(report)
    raise RuntimeError(f"model runner failed: {await cause}")


def _resolve(future: asyncio.Future[str], value: str) -> None:
    if not future.done():
        future.set_result(value)


def adapter_loader_for(runner: StepRunner) -> Callable[[str], object]:
    """CPU-only, thread-safe: loads an adapter folder into host weights for this base model."""
    make = getattr(runner, "make_adapter_loader", None)
    if make is None:
        raise TypeError(f"{type(runner).__name__} cannot load adapters")
    loader: Callable[[str], object] = make()
    return loader
