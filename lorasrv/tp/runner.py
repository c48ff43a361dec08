"""TpRunner: the StepRunner for tp_size > 1. Coordinates one worker process per rank from the
GPU runner's thread: hands each plan to every worker through shared memory, returns rank 0's
tokens. Holds no weights and never touches a device itself; the WorkerMonitor alone decides that
a worker has failed.
"""

from __future__ import annotations

import datetime
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import torch.multiprocessing as mp
from torch._C._distributed_c10d import TCPStore  # typed there; same object

from lorasrv.engine.step_runner import DoneStep, HostInputs
from lorasrv.errors import ConfigError
from lorasrv.ids import AdapterId
from lorasrv.messages import HostCopyReady, RunnerReady, StepPlan, StepResult
from lorasrv.model.adapter_loader import load_adapter
from lorasrv.model.arch import read_arch
from lorasrv.model.sharding import check_split
from lorasrv.model.startup import DTYPES
from lorasrv.tp.adapter_shards import TpAdapterWeights, pack_shards
from lorasrv.tp.channel import RESULT_TAG, ControlChannel
from lorasrv.tp.monitor import TpWorkerError, WorkerMonitor
from lorasrv.tp.plan_codec import PlanEncoder, decode_result
from lorasrv.tp.protocol import TpCommand, TpDropHostCopy, TpShutdown
from lorasrv.tp.shm_channel import MESSAGE, PLAN, CoordinatorLink, ShmLink
from lorasrv.tp.spawn import call_watched, spawn_workers, store_client, tp_device_type
from lorasrv.tp.worker import STORE_HOST, error_key

logger = logging.getLogger(__name__)


STARTUP_TIMEOUT_S = 1800.0  # spawn, connect, load and shard the weights, size the KV cache
STEP_TIMEOUT_S = 600.0  # one step or slot upload while cold (the first ones compile kernels)
WARM_STEP_TIMEOUT_S = 60.0  # once warm: a late first-time kernel compile takes seconds
NUM_COLD_STEPS = 8
HEARTBEAT_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 10.0


class TpRunner:
    """ModelRunner's keywords plus `tp_size`; rank r of the model runs in worker process r."""

    def __init__(
        self,
        *,
        tp_size: int,
        model_path: str,
        device: str = "auto",
        step_timeout_s: float = STEP_TIMEOUT_S,
        warm_step_timeout_s: float = WARM_STEP_TIMEOUT_S,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        runner_class: str = "lorasrv.model.runner:ModelRunner",
        **runner_options: Any,
    ) -> None:
        started = time.monotonic()
        self.tp_size = tp_size
        self.step_timeout_s = step_timeout_s
        self.warm_step_timeout_s = warm_step_timeout_s
        self._num_steps = 0
        self._runner_class = runner_class  # "module:Class" the workers run (benches: NullRunner)
        self.arch = read_arch(model_path)
        try:
            check_split(self.arch, tp_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        device_type = tp_device_type(device, tp_size)
        self._allow_pickle = bool(runner_options.get("allow_pickle", False))
        self._store = TCPStore(
            STORE_HOST,
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=60),
        )
        context = mp.get_context("spawn")
        link = ShmLink.create(context, tp_size)
        self._link = CoordinatorLink(link, self._check_alive)
        self._plans = PlanEncoder()
        # NOTE: each step's tokens are back before the next is sent, so plans' device inputs are
        # filled here and no worker needs another rank's tokens.
        self._inputs = HostInputs()
        self._processes, heartbeats = spawn_workers(
            context,
            link,
            runner_class=runner_class,
            runner_options={"model_path": model_path, **runner_options},
            tp_size=tp_size,
            store_port=self._store.port,
            device_type=device_type,
            collective_timeout_s=step_timeout_s,
        )
        self._monitor = WorkerMonitor(
            self._processes,
            heartbeats,
            heartbeat_timeout_s=heartbeat_timeout_s,
            read_error=self._read_error,
        )
        self._monitor.start()
        self._channel: ControlChannel | None = None
        self._is_shut_down = False
        self._encoder = msgspec.msgpack.Encoder()
        try:
            with self._guard("startup", startup_timeout_s):
                self._channel = call_watched(
                    lambda: ControlChannel(store_client(self._store), rank=0, size=tp_size + 1),
                    self._monitor,
                )
                ready = self._channel.broadcast(None, root=1)
                self._ready = msgspec.msgpack.decode(ready, type=RunnerReady)
        except BaseException:
            self.shutdown()
            raise
        self.page_size = self._ready.page_size
        self.num_kv_pages = self._ready.num_kv_pages
        logger.info(
            "tensor parallel: %d ranks (%s) ready in %.1fs", tp_size, device_type,
            time.monotonic() - started,
        )  # fmt: skip

    # ------------------------------------------------------------------ StepRunner protocol

    def ready(self) -> RunnerReady:
        return self._ready

    def launch(self, plan: StepPlan) -> DoneStep:
        """The step, run to its tokens: the overlap schedule still plans the next step while
        this one runs, but the workers get it once this one's tokens are back."""
        return DoneStep(self.step(plan))

    def step(self, plan: StepPlan) -> StepResult:
        # NOTE: a worker stuck inside a collective still beats its heartbeat; only this deadline
        # catches it, so it drops from minutes (kernels compiling) to one minute once warm.
        warm = self._num_steps >= NUM_COLD_STEPS
        self._num_steps += 1
        timeout_s = self.warm_step_timeout_s if warm else self.step_timeout_s
        plan = self._inputs.resolve(plan)
        with self._guard(f"step {plan.step_id}", timeout_s):
            self._send_plan(plan)
            if not plan.seq_ids:
                return StepResult()
            result = self._receive_result()
        self._inputs.record(plan, result)
        return result

    def add_host_copy(self, copy: HostCopyReady) -> None:
        """Ship every worker its packed shard now: the workers keep the host copies, so a
        plan's uploads are local to each rank (nothing crosses gloo at upload time)."""
        weights = copy.weights
        if not isinstance(weights, TpAdapterWeights):
            raise TypeError(f"host copy: expected TpAdapterWeights, got {type(weights).__name__}")
        with self._guard(f"host copy of adapter {copy.adapter_id}", self.step_timeout_s):
            self._send_message(weights.header(copy.adapter_id, copy.rank))
            channel = self._live_channel()
            channel.send_tensors({rank + 1: data for rank, data in enumerate(weights.buffers)})

    def drop_host_copy(self, adapter_id: AdapterId) -> None:
        with self._guard(f"dropping adapter {adapter_id}", self.step_timeout_s):
            self._send_message(TpDropHostCopy(adapter_id=adapter_id))

    def shutdown(self) -> None:
        """Ask the workers to stop; kill whichever has not within JOIN_TIMEOUT_S. Idempotent."""
        if self._is_shut_down:
            return
        self._is_shut_down = True
        is_healthy = self._monitor.failure is None
        self._monitor.stop()  # from here on, workers exiting is expected
        channel, self._channel = self._channel, None
        if is_healthy and channel is not None:
            stop = [self._encoder.encode(TpShutdown())]
            send = functools.partial(self._link.send, MESSAGE, stop, spill=channel.broadcast)
            thread = threading.Thread(target=_quietly, args=(send,), daemon=True)
            thread.start()
            thread.join(JOIN_TIMEOUT_S)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                logger.warning("tp worker pid %d did not stop; killing it", process.pid)
                process.kill()
                process.join(5)

    def make_adapter_loader(self) -> Callable[[str], TpAdapterWeights]:
        """Loads a PEFT folder on the host and cuts it into every rank's shard, once."""
        arch, tp_size, ready = self.arch, self.tp_size, self._ready
        dtype = DTYPES[ready.dtype]

        def load(path: str) -> TpAdapterWeights:
            weights = load_adapter(
                path,
                arch=arch,
                max_rank=ready.max_lora_rank,
                target_modules=ready.lora_target_modules,
                allow_pickle=self._allow_pickle,
                dtype=dtype,
            )
            # Never pinned here: this process has no device; the workers pin their shards.
            return pack_shards(weights, arch, tp_size, ready.lora_target_modules)

        return load

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """`listener(cause)` once a worker fails, from a monitor thread (even when idle)."""
        self._monitor.on_failure(listener)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    # ------------------------------------------------------------------ internals

    def _send_plan(self, plan: StepPlan) -> None:
        words, tail = self._plans.encode(plan)
        self._link.send(PLAN, [words, tail], spill=self._live_channel().broadcast)

    def _receive_result(self) -> StepResult:
        channel = self._live_channel()
        data = self._link.receive(lambda n: channel.recv_tensor(1, n, RESULT_TAG).numpy())
        return decode_result(data, data.nbytes // 8)

    def _send_message(self, command: TpCommand) -> None:
        channel = self._live_channel()
        self._link.send(MESSAGE, [self._encoder.encode(command)], spill=channel.broadcast)

    def _check_alive(self) -> None:
        """Raised out of a shared-memory wait once the monitor has declared a failure."""
        if self._monitor.failure is not None:
            raise TpWorkerError(self._monitor.failure)

    def _live_channel(self) -> ControlChannel:
        if self._channel is None:
            raise TpWorkerError(self._monitor.failure or "the tensor-parallel runner is shut down")
        return self._channel

    @contextmanager
    def _guard(self, what: str, timeout_s: float) -> Iterator[None]:
        """Bounds a wait on the workers; any error becomes a TpWorkerError naming the cause."""
        if self._monitor.failure is not None:
            raise TpWorkerError(self._monitor.failure)
        try:
            with self._monitor.deadline(what, timeout_s):
                yield
        except TpWorkerError:
            raise
        except Exception as exc:
            # A gloo error here usually means a worker just died: let the monitor name it.
            cause = self._monitor.wait_failure(2.0)
            if cause is None:
                cause = f"{what} failed on the coordinator: {exc!r}"
                self._monitor.fail(cause)  # ranks may now disagree: stop them all
            raise TpWorkerError(cause) from exc

    def _read_error(self, rank: int) -> str | None:
        key = error_key(rank)
        try:
            if self._store.check([key]):
                return self._store.get(key).decode(errors="replace")
        except Exception:
            logger.debug("could not read tp worker %d's error", rank, exc_info=True)
        return None


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:
        logger.debug("tp shutdown broadcast failed", exc_info=True)
