"""The adapters of one planned step: which may join the running batch, which rows they get, what
must be uploaded, and which queued requests' adapters to prefetch. Pure: no asyncio, no torch.

The running batch's adapters stay resident (never evicted under a running sequence), and at most
`cap` distinct adapters run at once when `--max-loras-per-batch` is given; without it, rows bound
the batch. Which requests try first when that capacity binds, and which running adapters drain
for a starving one, is admission.py's; a draining adapter admits no new request here.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import Final

from lorasrv.engine.residency import Residency
from lorasrv.engine.sequence import Sequence
from lorasrv.ids import AdapterId
from lorasrv.messages import AdapterRows

#: Host-to-device bytes a plan may prefetch for queued requests (at least one adapter): about
#: 10 ms of PCIe, which a decode step of a large model hides.
PREFETCH_BYTES_PER_STEP: Final = 256 << 20


class BatchAdapters:
    """Built once per plan from the residency table; records the plan's uploads."""

    def __init__(
        self,
        residency: Residency,
        *,
        cap: int | None,
        latest: frozenset[AdapterId],
        running: Iterable[Sequence],
        waiting: Iterable[Sequence],
        draining: frozenset[AdapterId] = frozenset(),
    ) -> None:
        self.residency = residency
        self.cap = cap
        self.latest = latest  # adapters the previous plan used or uploaded: never evicted now
        # NOTE: every running sequence keeps its adapter, even when this step skips it;
        # otherwise a prefill step could evict an adapter that is still decoding.
        self.in_batch: dict[AdapterId, None] = dict.fromkeys(
            s.adapter_id for s in running if s.adapter_id is not None
        )
        self.wanted = frozenset(s.adapter_id for s in waiting if s.adapter_id is not None)
        self.draining = draining  # running adapters that take no new request (admission.py)
        # Starving requests that found no capacity; None when this plan ran no admission.
        self.blocked: list[Sequence] | None = None
        self.uploads: list[AdapterRows] = []

    @property
    def protected(self) -> frozenset[AdapterId]:
        return self.latest | self.in_batch.keys()

    def cost(self, seq: Sequence) -> int:
        """0: base or already in the batch; 1: resident; 2: must be uploaded."""
        adapter_id = seq.adapter_id
        if adapter_id is None or adapter_id in self.in_batch:
            return 0
        return 1 if self.residency.is_resident(adapter_id) else 2

    def place_rows(self, adapter_id: AdapterId) -> int:
        """Rows that `adapter_id` gives back once it has left the batch (none if pinned)."""
        entry = self.residency.entries.get(adapter_id)
        return 0 if entry is None or entry.pinned else len(entry.rows)

    def obtainable_rows(self) -> int:
        return self.residency.obtainable_rows(self.protected)

    def fits(self, seq: Sequence) -> bool:
        adapter_id = seq.adapter_id
        if adapter_id is None:
            return True
        if adapter_id in self.in_batch:
            return adapter_id not in self.draining
        if self.cap is not None and len(self.in_batch) >= self.cap:
            return False
        if self.residency.is_resident(adapter_id):
            return True
        return seq.adapter_rank <= self.residency.obtainable_rows(self.protected)

    def take(self, seq: Sequence) -> None:
        """`seq` joins the batch: its adapter gets rows (and an upload) if it has none."""
        adapter_id = seq.adapter_id
        if adapter_id is None or adapter_id in self.in_batch:
            return
        if not self.residency.is_resident(adapter_id):
            rows = self.residency.place(
                adapter_id,
                seq.adapter_rank,
                pinned=seq.is_pinned_adapter,
                protected=self.protected,
                wanted=self.wanted,
            )
            assert rows is not None, "take() without fits()"
            self.uploads.append(AdapterRows(adapter_id, rows))
        self.in_batch[adapter_id] = None

    def binds(self, waiting: Seq[Sequence]) -> bool:
        """Could the waiting requests' adapters all join now? If not, capacity binds."""
        new = {
            s.adapter_id: s.adapter_rank
            for s in waiting
            if s.adapter_id is not None and s.adapter_id not in self.in_batch
        }
        if self.cap is not None and len(self.in_batch) + len(new) > self.cap:
            return True
        to_upload = sum(rank for a, rank in new.items() if not self.residency.is_resident(a))
        return to_upload > self.residency.obtainable_rows(self.protected)

    def prefetch(self, waiting: Iterable[Sequence], *, row_bytes: int, min_free_pages: int) -> None:
        """Upload queued requests' adapters into rows that cost nothing wanted: free rows, or
        rows of idle adapters no waiting request wants; while KV keeps `min_free_pages` free."""
        budget = PREFETCH_BYTES_PER_STEP
        arena = self.residency.arena
        has_prefetched = False
        for seq in waiting:
            adapter_id = seq.adapter_id
            if adapter_id is None or self.residency.is_resident(adapter_id):
                continue
            num_bytes = seq.adapter_rank * row_bytes
            short_of_pages = arena.num_allocatable_pages < min_free_pages  # cached ones count
            if (has_prefetched and num_bytes > budget) or short_of_pages:
                return
            rows = self.residency.place(
                adapter_id,
                seq.adapter_rank,
                pinned=seq.is_pinned_adapter,
                protected=self.protected,
                wanted=self.wanted,
                may_evict_wanted=False,
            )
            if rows is None:
                return
            self.uploads.append(AdapterRows(adapter_id, rows))
            budget -= num_bytes
            has_prefetched = True
