"""Starting a TpRunner's workers: the device type, one spawned process per rank with its
heartbeat, the coordinator's own TCPStore connection, and waits that a worker failure ends.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch._C._distributed_c10d import TCPStore  # typed there; same object

from lorasrv.errors import ConfigError
from lorasrv.tp.monitor import TpWorkerError, WorkerMonitor
from lorasrv.tp.shm_channel import ShmLink
from lorasrv.tp.worker import STORE_HOST, WorkerSpec, run_worker

logger = logging.getLogger(__name__)

T = TypeVar("T")


def tp_device_type(device: str, tp_size: int) -> str:
    """ "cuda" or "cpu" for `--device` (auto: cuda when there is one); enough CUDA devices."""
    device_type = device.split(":")[0]
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        found = torch.cuda.device_count()
        if found < tp_size:
            raise ConfigError(f"--tp-size {tp_size} needs {tp_size} CUDA devices; {found} visible")
    elif device_type != "cpu":
        raise ConfigError(f"--device {device}: tensor parallelism runs on cuda or cpu")
    return device_type


def spawn_workers(
    context: Any,
    link: ShmLink,
    *,
    runner_class: str,
    runner_options: dict[str, Any],
    tp_size: int,
    store_port: int,
    device_type: str,
    collective_timeout_s: float,
) -> tuple[list[Any], list[Any]]:
    """One started worker process per rank, and each one's heartbeat counter."""
    processes, heartbeats = [], []
    for rank in range(tp_size):
        heartbeat = context.Value("Q", 0, lock=False)
        spec = WorkerSpec(
            tp_rank=rank,
            tp_size=tp_size,
            store_port=store_port,
            device_type=device_type,
            runner_options=runner_options,
            parent_pid=os.getpid(),
            log_level=logging.getLogger().getEffectiveLevel(),
            heartbeat=heartbeat,
            collective_timeout_s=collective_timeout_s,
            link=link,
            runner_class=runner_class,
        )
        # daemon: multiprocessing kills them if this process exits without shutdown().
        process = context.Process(
            target=run_worker, args=(spec,), name=f"lorasrv-tp{rank}", daemon=True
        )
        process.start()
        logger.info("tp worker %d started: pid %d", rank, process.pid)
        processes.append(process)
        heartbeats.append(heartbeat)
    return processes, heartbeats


def store_client(store: TCPStore) -> TCPStore:
    """A connection of its own: a TCPStore client serializes its calls, and the group's
    rendezvous waits on keys that the monitor's error lookups must not queue behind."""
    return TCPStore(STORE_HOST, store.port, is_master=False, timeout=datetime.timedelta(seconds=60))


def call_watched(fn: Callable[[], T], monitor: WorkerMonitor) -> T:
    """Run a call that may block on absent workers in a helper thread, so a failure seen by
    the monitor (a worker that died before connecting) ends the wait."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:
            box.append((False, exc))

    thread = threading.Thread(target=target, name="lorasrv-tp-connect", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        if monitor.failure is not None:
            raise TpWorkerError(monitor.failure)
    is_ok, value = box[0]
    if not is_ok:
        raise value
    result: T = value
    return result
