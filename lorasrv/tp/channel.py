"""The control channel's slow lane: coordinator (rank 0) and workers (ranks 1..n) in one gloo
process group, for what is not a step: the workers' RunnerReady (broadcast from rank 1, TP rank
0), adapter bytes (point to point), and commands or results too large for shared memory
(shm_channel.py carries every step). All of it torch.distributed on CPU tensors. Every call
blocks until done: the coordinator's monitor ends a wait that would never end by killing the
workers (gloo raises).
"""

from __future__ import annotations

import datetime
import struct
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store  # typed there; same objects
from torch.distributed import ProcessGroupGloo

#: one broadcast carries this much (length prefix included); longer payloads take a second one
CAPACITY_BYTES = 64 << 10
#: gloo closes a connection whose operation times out, so waits are unbounded here (an idle
#: server waits for its next step indefinitely); failures are detected by the monitor instead
NO_TIMEOUT = datetime.timedelta(days=365)
ADAPTER_TAG = 1
RESULT_TAG = 2
_LENGTH = struct.Struct("<q")


class ControlChannel:
    """One rank's end of the control group; not thread-safe (one caller thread per rank)."""

    def __init__(self, store: Store, *, rank: int, size: int) -> None:
        # The gloo options class (timeout, devices) is private and missing from torch's stubs.
        gloo: Any = ProcessGroupGloo
        options = gloo._Options()
        options._timeout = NO_TIMEOUT
        # Every rank is on this host: loopback, whatever the host name resolves to.
        options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        self.rank = rank
        self._group: Any = gloo(PrefixStore("tp-control/", store), rank, size, options)
        self._buffer = torch.empty(CAPACITY_BYTES, dtype=torch.uint8)
        self._view = self._buffer.numpy()  # shares memory with _buffer

    def broadcast(self, payload: bytes | None, root: int = 0) -> bytes:
        """The root passes its payload, the others None; every rank returns the payload.

        The workers' RunnerReady travels this way too (root = worker 0): gloo's point-to-point
        round trip is several times slower than a broadcast's.
        """
        rest = self._fill(payload) if payload is not None else b""
        options = dist.BroadcastOptions()
        options.rootRank = root
        self._group.broadcast([self._buffer], options).wait()
        length, first = self._read()
        if length == len(first):
            return first
        if payload is not None:
            tail = bytes_tensor(rest)
        else:
            tail = torch.empty(length - len(first), dtype=torch.uint8)
        self._group.broadcast([tail], options).wait()
        return first + tail.numpy().tobytes()

    def send_tensors(self, tensors: dict[int, torch.Tensor], tag: int = ADAPTER_TAG) -> None:
        """Each destination rank its own uint8 tensor; all posted before any wait."""
        works = [self._group.send([t], dst, tag) for dst, t in tensors.items() if t.numel()]
        for work in works:
            work.wait()

    def recv_tensor(self, src: int, num_bytes: int, tag: int = ADAPTER_TAG) -> torch.Tensor:
        data = torch.empty(num_bytes, dtype=torch.uint8)
        if num_bytes:
            self._group.recv([data], src, tag).wait()
        return data

    def _fill(self, payload: bytes) -> bytes:
        """Length prefix and the first chunk into the buffer; returns what did not fit."""
        head = CAPACITY_BYTES - _LENGTH.size
        _LENGTH.pack_into(self._view.data, 0, len(payload))
        first = payload[:head]
        self._view[_LENGTH.size : _LENGTH.size + len(first)] = np.frombuffer(first, np.uint8)
        return payload[head:]

    def _read(self) -> tuple[int, bytes]:
        (length,) = _LENGTH.unpack_from(self._view.data, 0)
        end = _LENGTH.size + min(length, CAPACITY_BYTES - _LENGTH.size)
        return length, self._view[_LENGTH.size : end].tobytes()


def bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
