"""GpuRunnerActor: the one owner of the model. Runs the StepRunner on its own single thread so the
event loop never blocks on the GPU; the only engine module that imports `lorasrv.model`.

Steps are launched on that thread and answered from another one as their tokens reach the host,
so a step planned before the previous one's tokens are back is launched behind it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, assert_never

from lorasrv.engine.actor import Actor, Sender
from lorasrv.engine.step_runner import DoneStep, PendingStep, StepRunner
from lorasrv.messages import (
    HostCopyDropped,
    HostCopyReady,
    RunnerInbox,
    RunnerReady,
    RunStep,
    SchedulerInbox,
    StepDone,
    StepPlan,
)

if TYPE_CHECKING:
    from lorasrv.config import ServerConfig
    from lorasrv.engine.lora_spec import LoraPoolSpec

logger = logging.getLogger(__name__)


class GpuRunnerActor(Actor[RunnerInbox]):
    """Inbox order is launch order: a host copy sent before a RunStep is there for its uploads.
    StepDone comes in launch order too, each as soon as its step's tokens are on the host."""

    name = "gpu_runner"

    def __init__(
        self, *, factory: Callable[[], StepRunner], scheduler: Sender[SchedulerInbox]
    ) -> None:
        super().__init__()
        self._factory = factory
        self._scheduler = scheduler
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasrv-gpu")
        # Waits for launched steps' tokens, so the runner thread is free to launch the next one.
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorasrv-gpu-wait")
        self._launched: asyncio.Queue[tuple[StepPlan, PendingStep]] = asyncio.Queue()
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
        tasks = (
            asyncio.ensure_future(_reported_failure(self.runner.on_failure)),
            asyncio.ensure_future(self._serve()),
            asyncio.ensure_future(self._collect()),
        )
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done():
                    task.result()  # raises: the engine's supervisor stops everything
        finally:
            for task in tasks:
                task.cancel()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.inbox.get()]
            while not self.inbox.empty():
                batch.append(self.inbox.get_nowait())
            await loop.run_in_executor(self._executor, self._execute, batch, loop)

    async def _collect(self) -> None:
        """Answers launched steps in launch order, each once its tokens are on the host."""
        loop = asyncio.get_running_loop()
        while True:
            plan, pending = await self._launched.get()
            if isinstance(pending, DoneStep):
                result = pending.result()
            else:
                result = await loop.run_in_executor(self._waiter, pending.result)
            sampled = tuple(itertools.compress(plan.seq_ids, plan.sample_rows))
            self._scheduler.send(StepDone(step_id=plan.step_id, seq_ids=sampled, result=result))

    def _execute(self, batch: list[RunnerInbox], loop: asyncio.AbstractEventLoop) -> None:
        """Runs on the runner thread, in inbox order; each launched step goes to `_collect` at
        once (a later step of the batch may launch while it runs)."""
        runner = self.runner
        for msg in batch:
            match msg:
                case HostCopyReady():
                    runner.add_host_copy(msg)
                case HostCopyDropped(adapter_id=adapter_id):
                    runner.drop_host_copy(adapter_id)
                case RunStep(plan=plan):
                    pending = runner.launch(plan)
                    if plan.seq_ids:  # else freed sequences and uploads only: nobody waits
                        loop.call_soon_threadsafe(self._launched.put_nowait, (plan, pending))
                case _:
                    assert_never(msg)

    async def shutdown(self) -> None:
        if self._runner is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._runner.shutdown)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._waiter.shutdown(wait=False, cancel_futures=True)


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
