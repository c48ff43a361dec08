"""The TP control path's fast lane: commands to the workers and rank 0's results through shared
memory, wake-ups by semaphores. No socket, no collective, no pickling on a step.

- **Commands** (coordinator -> every worker): `COMMAND_SLOTS` slots used in turn, each
  `[seq, kind, num_bytes]` then the payload (a plan's words and tail, plan_codec.py; or a
  msgpack protocol message). The coordinator writes one, then releases each worker's semaphore;
  a worker reads it, decodes, and acknowledges (`acks[rank] = seq`) before it computes. The
  coordinator reuses a slot once every worker has acknowledged the command it held, so it never
  waits for a slow worker to pick up the command just before. A payload larger than a slot is
  *spilled*: the header says so and the bytes follow by one gloo broadcast on the control group
  (channel.py).
- **Results** (TP rank 0 -> coordinator): `RESULT_SLOTS` slots, used in turn, each
  `[index + 1, spilled, num_bytes]` then the words; one semaphore counts results ready. Rank 0
  writes result k only after the coordinator has read result k - RESULT_SLOTS, so a later
  schedule may send step N+1 before reading step N's result. A result larger than a slot goes
  point to point over gloo (sends block until read: such a result must be read before the
  next one is produced).

Blocking waits take a `check` callable that raises when the monitor has declared a failure, so a
dead worker never leaves the coordinator waiting; workers wait without a bound (their heartbeat
thread ends them when the server is gone).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

COMMAND_BYTES = 2 << 20  # per slot: a 256-row plan's first step at 1,000 pages per row fits
COMMAND_SLOTS = 2
RESULT_BYTES = 1 << 20  # per slot
RESULT_SLOTS = 2
HEADER_WORDS = 3
PLAN = 1  # command kinds
MESSAGE = 2
_HEADER_BYTES = 8 * HEADER_WORDS
_POLL_S = 0.05  # how often a coordinator wait looks at the monitor


@dataclass(frozen=True)
class ShmLink:
    """The shared objects, made by the coordinator before it spawns the workers and handed to
    each in its WorkerSpec (multiprocessing shares them at spawn)."""

    commands: Any  # RawArray('b'): COMMAND_SLOTS x (header + payload)
    results: Any  # RawArray('b'): RESULT_SLOTS x (header + payload)
    words: Any  # RawArray('q'): acks per worker, then results read by the coordinator
    wake: tuple[Any, ...]  # Semaphore per worker: a command is ready
    ready: Any  # Semaphore: results ready (TP rank 0 -> coordinator)

    @classmethod
    def create(cls, context: Any, tp_size: int) -> ShmLink:
        return cls(
            commands=context.RawArray("b", COMMAND_SLOTS * (_HEADER_BYTES + COMMAND_BYTES)),
            results=context.RawArray("b", RESULT_SLOTS * (_HEADER_BYTES + RESULT_BYTES)),
            words=context.RawArray("q", tp_size + 1),
            wake=tuple(context.Semaphore(0) for _ in range(tp_size)),
            ready=context.Semaphore(0),
        )


class _Views:
    def __init__(self, link: ShmLink) -> None:
        self.commands = np.frombuffer(link.commands, dtype=np.uint8).reshape(COMMAND_SLOTS, -1)
        self.results = np.frombuffer(link.results, dtype=np.uint8).reshape(RESULT_SLOTS, -1)
        words = np.frombuffer(link.words, dtype=np.int64)
        self.acks, self.num_read = words[:-1], words[-1:]

    def command_slot(self, seq: int) -> tuple[np.ndarray, np.ndarray]:
        slot = self.commands[seq % COMMAND_SLOTS]
        return slot[:_HEADER_BYTES].view(np.int64), slot[_HEADER_BYTES:]

    def result_slot(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        slot = self.results[index % RESULT_SLOTS]
        return slot[:_HEADER_BYTES].view(np.int64), slot[_HEADER_BYTES:]


class CoordinatorLink:
    """The coordinator's end; one caller thread."""

    def __init__(self, link: ShmLink, check: Callable[[], None]) -> None:
        self._link, self._views, self._check = link, _Views(link), check
        self._seq = 0
        self._num_results = 0

    def send(self, kind: int, parts: list[Any], spill: Callable[[bytes], object]) -> None:
        """Write a command (`parts`: buffers, concatenated) and wake every worker. A payload
        over COMMAND_BYTES goes through `spill` (the gloo broadcast) after the wake-up."""
        seq = self._seq + 1
        self._wait_acks(seq - COMMAND_SLOTS)  # the slot's last command was read everywhere
        head, payload = self._views.command_slot(seq)
        sizes = [memoryview(p).nbytes for p in parts]
        total = sum(sizes)
        spilled = total > COMMAND_BYTES
        if not spilled:
            at = 0
            for part, size in zip(parts, sizes, strict=True):
                payload[at : at + size] = np.frombuffer(part, dtype=np.uint8)
                at += size
        head[1:] = (kind | (0x100 if spilled else 0), total)
        head[0] = seq  # last: the header is complete once seq moves
        self._seq = seq
        for wake in self._link.wake:
            wake.release()
        if spilled:
            spill(b"".join(bytes(memoryview(p)) for p in parts))

    def receive(self, recv_spilled: Callable[[int], Any]) -> memoryview:
        """The next result's words (a copy; the slot is free again when this returns)."""
        while not self._link.ready.acquire(timeout=_POLL_S):
            self._check()
        head, payload = self._views.result_slot(self._num_results)
        index, spilled, num_bytes = (int(x) for x in head)
        if index != self._num_results + 1:
            raise RuntimeError(f"result {self._num_results + 1} expected, slot holds {index}")
        data = recv_spilled(num_bytes) if spilled else payload[:num_bytes].tobytes()
        self._num_results += 1
        self._views.num_read[0] = self._num_results
        return memoryview(data)

    def _wait_acks(self, seq: int) -> None:
        acks = self._views.acks
        spins = 0
        while (acks < seq).any():
            self._check()
            spins += 1
            _pause(spins)


class WorkerLink:
    """One worker's end; one caller thread."""

    def __init__(self, link: ShmLink, rank: int) -> None:
        self._link, self._views, self._rank = link, _Views(link), rank
        self._seq = 0
        self._num_results = 0

    def receive(self, spilled: Callable[[], bytes]) -> tuple[int, memoryview]:
        """Wait for the next command: `(kind, payload)`. The payload is a view of shared memory,
        valid until `ack()`; `spilled()` fetches one that did not fit (the gloo broadcast)."""
        self._link.wake[self._rank].acquire()
        head, payload = self._views.command_slot(self._seq + 1)
        seq, kind, num_bytes = (int(x) for x in head)
        if seq != self._seq + 1:
            raise RuntimeError(f"tp control: command {self._seq + 1} expected, found {seq}")
        self._seq = seq
        if kind & 0x100:
            return kind & 0xFF, memoryview(spilled())
        return kind, payload[:num_bytes].data

    def ack(self) -> None:
        """The command is read: the coordinator may overwrite it."""
        self._views.acks[self._rank] = self._seq

    def send_result(self, words: np.ndarray, spill: Callable[[bytes], object]) -> None:
        """TP rank 0: one result, into the next slot once the coordinator has read the result
        that used it last."""
        index = self._num_results
        spins = 0
        while int(self._views.num_read[0]) < index + 1 - RESULT_SLOTS:
            spins += 1
            _pause(spins)
        head, payload = self._views.result_slot(index)
        data = words.view(np.uint8)
        spilled = data.size > payload.size
        if not spilled:
            payload[: data.size] = data
        head[1:] = (int(spilled), data.size)
        head[0] = index + 1
        self._num_results += 1
        self._link.ready.release()
        if spilled:
            spill(data.tobytes())


def _pause(spins: int) -> None:
    """Between two looks at shared memory: give the core away (the peer may need it), then,
    after a while, sleep."""
    if spins < 1000:
        os.sched_yield()
    else:
        time.sleep(1e-4)
