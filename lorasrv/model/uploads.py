"""Adapter host copies held by the runner, and their uploads into arena rows.

On CUDA an upload runs on a side stream with one event per adapter, so prefetches overlap the step
they were planned with; that step's compute waits only on the uploads of the adapters it uses, and
the next step on every earlier upload. Owns no rows: the scheduler's planner decides them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from lorasrv.ids import AdapterId
from lorasrv.messages import AdapterRows, StepPlan
from lorasrv.model.lora_backend import AdapterInfo
from lorasrv.model.lora_layout import HostAdapter
from lorasrv.model.lora_pool import LoraPool

logger = logging.getLogger(__name__)


class Uploader:
    """Host copies by adapter id, and the copies of them into the rows a plan names."""

    def __init__(self, pool: LoraPool, device: torch.device) -> None:
        self.pool = pool
        self.device = device
        self.host: dict[AdapterId, HostAdapter] = {}
        # Kept after the host copy is dropped: the adapter's rows may stay resident and used.
        self.info: dict[AdapterId, AdapterInfo] = {}
        self._stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        # Uploads issued for the current plan (adapter id -> event after its copies), and the
        # events of earlier plans' uploads that may still run.
        self._current: dict[AdapterId, torch.cuda.Event] = {}
        self._earlier: list[torch.cuda.Event] = []
        self.num_uploads = 0
        # row -> the upload (its `num_uploads` count) that last wrote it: copies taken from the
        # rows before that (the hot A cache's) are stale
        self.row_writes: dict[int, int] = {}

    def add(self, adapter_id: AdapterId, host: object, rank: int, scaling: float) -> None:
        if not isinstance(host, HostAdapter):
            raise TypeError(f"host copy of adapter {adapter_id}: got {type(host).__name__}")
        # NOTE: a rank above the copy's own is served (its extra rows are zeroed at upload):
        # the planner may count an adapter's rank from its config, which can exceed its tensors'.
        if host.rank > rank or host.rows.shape[1] != self.pool.layout.row_elems:
            raise ValueError(
                f"host copy of adapter {adapter_id}: rows {tuple(host.rows.shape)} do not fit "
                f"rank {rank} and rows of {self.pool.layout.row_elems} elements"
            )
        if abs(scaling - host.scaling) > 1e-6 * abs(host.scaling):
            logger.warning(
                "adapter %d: scaling %g sent, its B was folded for %g; using the latter",
                adapter_id, scaling, host.scaling,
            )  # fmt: skip
        self.host[adapter_id] = host
        self.info[adapter_id] = AdapterInfo(rank, host.scaling)

    def drop(self, adapter_id: AdapterId) -> None:
        self.host.pop(adapter_id, None)  # rank and scaling stay: its rows may still be used

    def upload(self, uploads: Iterable[AdapterRows]) -> None:
        """Write each adapter's host copy into its rows, ordered after every launched step.

        Called once per plan, before its compute (with no uploads too: a new plan starts).
        """
        self._earlier += self._current.values()
        self._current = {}
        for entry in uploads:
            host = self.host.get(entry.adapter_id)
            if host is None:
                raise ValueError(f"upload of adapter {entry.adapter_id}: no host copy")
            rank = self.info[entry.adapter_id].rank
            if len(entry.rows) != rank:
                raise ValueError(
                    f"upload of adapter {entry.adapter_id}: {len(entry.rows)} rows for rank {rank}"
                )
            self.num_uploads += 1
            self.row_writes.update(dict.fromkeys(entry.rows, self.num_uploads))
            if self._stream is None:
                self.pool.write(entry.rows, host.rows)
                continue
            # NOTE: rows may overlay KV pages that a step in flight (the overlap schedule) still
            # writes: the side stream starts after everything launched so far.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self.pool.write(entry.rows, host.rows)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(self._stream)
                self._current[entry.adapter_id] = event

    def wait(self, plan: StepPlan) -> None:
        """Make the compute stream wait for the uploads this step may read: those of its own
        adapters, and every upload of an earlier plan.

        NOTE: an earlier plan's prefetch must land before this step: the planner may since have
        given its rows, or the KV pages under them, to someone else.
        """
        if not self._current and not self._earlier:
            return
        stream = torch.cuda.current_stream(self.device)
        for event in self._earlier:
            stream.wait_event(event)
        self._earlier = []
        for entry in plan.adapters:
            pending = self._current.get(entry.adapter_id)
            if pending is not None:
                stream.wait_event(pending)

    def check_rows(self, adapters: Iterable[AdapterRows]) -> None:
        """A plan's adapters must be known, with one row per rank, inside the arena."""
        for entry in adapters:
            info = self.info.get(entry.adapter_id)
            if info is None:
                raise ValueError(f"plan uses adapter {entry.adapter_id}, never sent to the runner")
            if len(entry.rows) != info.rank:
                raise ValueError(
                    f"plan gives adapter {entry.adapter_id} {len(entry.rows)} rows for rank "
                    f"{info.rank}"
                )
            if entry.rows and not 0 <= min(entry.rows) <= max(entry.rows) < self.pool.max_rows:
                raise ValueError(f"adapter {entry.adapter_id}: row outside the arena's rows")
