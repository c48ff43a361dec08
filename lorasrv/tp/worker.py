"""A TP worker process: one rank of the model. Runs a sharded ModelRunner and obeys the
coordinator's commands (shared memory, shm_channel.py) until told to stop; any error ends the
process (exit 1).

Started with the spawn method; `run_worker` is the process target. No asyncio, no engine.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, assert_never

import msgspec
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore  # typed there; same objects

from lorasrv.ids import AdapterId
from lorasrv.messages import HostCopyReady
from lorasrv.model.parallel import TpGroup
from lorasrv.model.runner import ModelRunner
from lorasrv.tp.adapter_shards import unpack_shard
from lorasrv.tp.channel import RESULT_TAG, ControlChannel, bytes_tensor
from lorasrv.tp.plan_codec import PlanDecoder, encode_result
from lorasrv.tp.protocol import TpAddHostCopy, TpCommand, TpDropHostCopy, TpShutdown
from lorasrv.tp.shm_channel import PLAN, ShmLink, WorkerLink

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
STORE_HOST = "127.0.0.1"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, pickled into the spawned process."""

    tp_rank: int
    tp_size: int
    store_port: int
    device_type: str  # "cuda" (rank r uses cuda:r) or "cpu"
    runner_options: dict[str, Any]  # ModelRunner keywords, device and tp excepted
    parent_pid: int
    log_level: int
    heartbeat: Any  # multiprocessing Value("Q"), incremented while the process lives
    collective_timeout_s: float  # model-group collectives (NCCL's watchdog aborts past it)
    link: ShmLink  # the control path's shared memory and semaphores
    runner_class: str = "lorasrv.model.runner:ModelRunner"  # "module:Class" (benches, tests)


def error_key(tp_rank: int) -> str:
    """Store key where a failing worker leaves its error for the coordinator's message."""
    return f"tp-error/{tp_rank}"


def run_worker(spec: WorkerSpec) -> None:
    """Process target. Exit status 0 after TpShutdown, 1 after any error (logged first)."""
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s %(levelname)s tp{spec.tp_rank} %(name)s: %(message)s",
        force=True,
    )
    # The coordinator decides when workers stop: Ctrl-C reaches the whole process group, and
    # the server's own graceful shutdown then stops us through TpShutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    beat = threading.Thread(target=_heartbeat, args=(spec,), name="lorasrv-tp-heartbeat")
    beat.daemon = True
    beat.start()
    store: TCPStore | None = None
    try:
        store = TCPStore(
            STORE_HOST, spec.store_port, is_master=False, timeout=datetime.timedelta(seconds=60)
        )
        _serve(spec, store)
    except BaseException as exc:
        if os.getppid() != spec.parent_pid:  # the control connection broke with the server
            logger.error("tp worker %d: the server process is gone; exiting", spec.tp_rank)
        else:
            logger.exception("tp worker %d failed", spec.tp_rank)
        if store is not None:
            with contextlib.suppress(Exception):  # the coordinator may be gone already
                store.set(error_key(spec.tp_rank), f"{type(exc).__name__}: {exc}"[:2000])
        sys.stderr.flush()
        os._exit(1)  # no teardown: peers may be stuck in collectives with us


def _serve(spec: WorkerSpec, store: TCPStore) -> None:
    rank, size = spec.tp_rank, spec.tp_size
    channel = ControlChannel(store, rank=rank + 1, size=size + 1)
    device = _init_device(spec)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=PrefixStore("tp-model/", store),
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=spec.collective_timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    runner_class = _import(spec.runner_class)
    runner = runner_class(**spec.runner_options, device=str(device), tp=TpGroup(rank, size, device))
    # RunnerReady comes from TP rank 0 (control rank 1); the other ranks take part, unused.
    channel.broadcast(msgspec.msgpack.encode(runner.ready()) if rank == 0 else None, root=1)
    _obey(runner, channel, WorkerLink(spec.link, rank), rank, pin=device.type == "cuda")
    dist.destroy_process_group()
    logger.info("tp worker %d stopped", rank)


def _obey(runner: Any, channel: ControlChannel, link: WorkerLink, rank: int, pin: bool) -> None:
    """Run commands until TpShutdown. Steps come as plan words; rank 0 answers with result
    words (a result too large for its slot goes point to point to the coordinator)."""
    plans, decoder = PlanDecoder(), msgspec.msgpack.Decoder(TpCommand)

    def spill_result(data: bytes) -> None:
        channel.send_tensors({0: bytes_tensor(data)}, tag=RESULT_TAG)

    while True:
        kind, payload = link.receive(lambda: channel.broadcast(None))
        if kind == PLAN:
            plan = plans.decode(payload)
            link.ack()
            result = runner.step(plan)
            if plan.seq_ids and rank == 0:  # the coordinator waits for rank 0's tokens
                link.send_result(encode_result(result), spill_result)
            continue
        command = decoder.decode(payload)
        link.ack()
        match command:
            case TpAddHostCopy() as header:
                data = channel.recv_tensor(0, header.num_bytes)
                host = unpack_shard(header, data, pin_memory=pin)
                copy = HostCopyReady(
                    adapter_id=AdapterId(header.adapter_id),
                    weights=host,
                    rank=header.rank,
                    scaling=header.scaling,
                )
                runner.add_host_copy(copy)
            case TpDropHostCopy(adapter_id=adapter_id):
                runner.drop_host_copy(AdapterId(adapter_id))
            case TpShutdown():
                runner.shutdown()
                return
            case _:
                assert_never(command)


def _import(name: str) -> Any:
    module, _, attr = name.partition(":")
    if module == "lorasrv.model.runner" and attr == "ModelRunner":
        return ModelRunner
    return getattr(importlib.import_module(module), attr)


def _init_device(spec: WorkerSpec) -> torch.device:
    if spec.device_type == "cuda":
        device = torch.device("cuda", spec.tp_rank)
        torch.cuda.set_device(device)
        return device
    # Ranks share the host's cores; without this each would start one thread per core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.tp_size))
    return torch.device("cpu")


def _heartbeat(spec: WorkerSpec) -> None:
    """Proof of life for the coordinator's monitor; ends the process if the server is gone."""
    while True:
        spec.heartbeat.value += 1
        if os.getppid() != spec.parent_pid:
            logger.error("tp worker %d: the server process is gone; exiting", spec.tp_rank)
            os._exit(1)
        time.sleep(HEARTBEAT_INTERVAL_S)
