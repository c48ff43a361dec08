"""The scheduler's planner: owns the arena accounting (KV pages and LoRA rows) and GPU residency,
and plans each step against them, synchronously. Pure: no asyncio, no torch.

A plan's adapters are resident by the time it is sent: the ones it brings in are in its
`uploads` (with prefetches for queued requests), which the runner writes before the step's
compute. Rows of adapters that the previous plan used or uploaded are never reassigned while a
sequence runs. Steps still in flight (the overlap schedule) never see a page or row change under
them: the runner orders every upload after the steps launched before it, and steps run in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Literal, NamedTuple

from lorasrv.config import AdapterConfig, SchedulerConfig
from lorasrv.engine.admission import choose_drains
from lorasrv.engine.arena import Arena, ArenaGeometry, arena_floors
from lorasrv.engine.batch_adapters import BatchAdapters
from lorasrv.engine.policy import BatchDecision, PlanLimits, plan_batch
from lorasrv.engine.prefix_pages import PrefixPages
from lorasrv.engine.residency import Residency
from lorasrv.engine.sequence import Sequence
from lorasrv.engine.stats import GpuAdapter, SchedulerStats
from lorasrv.ids import AdapterId
from lorasrv.messages import AdapterRows, RunnerReady


class Planned(NamedTuple):
    decision: BatchDecision
    adapters: tuple[AdapterRows, ...]  # the adapters the rows use, by adapter id
    uploads: tuple[AdapterRows, ...]


def make_arena(ready: RunnerReady, max_loras_per_batch: int | None) -> Arena:
    geometry = ArenaGeometry(
        ready.num_kv_pages, ready.kv_page_bytes, ready.lora_row_bytes, ready.lora_max_rows
    )
    floors = arena_floors(
        geometry,
        page_size=ready.page_size,
        context_length=ready.context_length,
        max_lora_rank=ready.max_lora_rank,
        max_loras_per_batch=max_loras_per_batch,
    )
    return Arena(geometry, floors)


def lora_capacity(arena: Arena, max_lora_rank: int, max_loras_per_batch: int | None) -> int:
    """Distinct adapters a batch may hold: the cap when given, at most what the rows allow at
    the maximum rank (all rows above the KV floor); 0 when LoRA is off."""
    if not arena.geometry.max_rows or max_lora_rank <= 0:
        return 0
    by_memory = (arena.geometry.max_rows - arena.first_row) // max_lora_rank
    return by_memory if max_loras_per_batch is None else min(max_loras_per_batch, by_memory)


def effective_capacity(ready: RunnerReady, max_loras_per_batch: int | None) -> int:
    """lora_capacity of the arena a runner reports (for the adapter manager's pinning rule)."""
    arena = make_arena(ready, max_loras_per_batch)
    return lora_capacity(arena, ready.max_lora_rank, max_loras_per_batch)


def planner_for(cfg: SchedulerConfig, adapter_cfg: AdapterConfig, ready: RunnerReady) -> Planner:
    """The scheduler's planner: its limits from the config and what the runner measured."""
    limits = PlanLimits(
        token_budget=cfg.chunked_prefill_size,
        max_running=cfg.max_running_requests,
        page_size=ready.page_size,
        context_length=ready.context_length,
        mixed_chunk=cfg.enable_mixed_chunk,
    )
    return Planner(
        ready,
        limits,
        max_loras_per_batch=adapter_cfg.max_loras_per_batch,
        eviction_policy=adapter_cfg.lora_eviction_policy,
        prefix_cache=not cfg.disable_radix_cache,
    )


class Planner:
    def __init__(
        self,
        ready: RunnerReady,
        limits: PlanLimits,
        *,
        max_loras_per_batch: int | None,
        eviction_policy: Literal["lru", "fifo"],
        prefix_cache: bool = True,
    ) -> None:
        self.arena = make_arena(ready, max_loras_per_batch)
        self.cache = PrefixPages(self.arena, ready.page_size, enabled=prefix_cache)
        self.residency = Residency(self.arena, eviction_policy, self.cache.reclaim_rows)
        self.limits = limits
        self.cap = max_loras_per_batch
        self.capacity = lora_capacity(self.arena, ready.max_lora_rank, max_loras_per_batch)
        self.row_bytes = ready.lora_row_bytes
        self.latest: frozenset[AdapterId] = frozenset()  # used or uploaded by the latest plan
        self.draining: frozenset[AdapterId] = frozenset()  # admit no new request (admission.py)
        self._gpu_snapshot: tuple[int, tuple[GpuAdapter, ...]] = (-1, ())

    def plan(
        self, running: list[Sequence], waiting: deque[Sequence], step_no: int, *, prefill_turn: bool
    ) -> Planned:
        """Choose the next step's rows (plan_batch), give its adapters rows, prefetch queued
        requests' adapters; commits pages and rows."""
        latest = self.latest if running else frozenset()
        self.residency.free_retired(latest)
        draining = self._still_draining(running, waiting, step_no)
        memory = BatchAdapters(self.residency, cap=self.cap, latest=latest, running=running,
                               waiting=waiting, draining=draining)  # fmt: skip
        decision = plan_batch(
            running, waiting, memory, self.limits, step_no, prefill_turn=prefill_turn,
            cache=self.cache,
        )  # fmt: skip
        self.draining = self._drains(memory, decision, running, waiting, draining, step_no)
        memory.prefetch(waiting, row_bytes=self.row_bytes, min_free_pages=len(running) + 1)
        used = sorted({r.seq.adapter_id for r in decision.rows if r.seq.adapter_id is not None})
        adapters = tuple(AdapterRows(a, self._rows(a)) for a in used)
        for adapter_id in used:
            self.residency.touch(adapter_id)
        uploads = tuple(memory.uploads)
        self.latest = frozenset(used).union(u.adapter_id for u in uploads)
        return Planned(decision, adapters, uploads)

    def _drains(
        self,
        memory: BatchAdapters,
        decision: BatchDecision,
        running: list[Sequence],
        waiting: deque[Sequence],
        draining: frozenset[AdapterId],
        step_no: int,
    ) -> frozenset[AdapterId]:
        """The drains after this plan: chosen anew when admission was blocked for a starving
        request, and only those whose adapter is still in the batch (a drain ends when its
        adapter leaves, by this plan's preemptions or exhaustion too). Nothing to do, and no
        pass over the running rows, on the usual step with neither."""
        if memory.blocked is None and not draining:
            return draining
        exhausted = set(map(id, decision.exhausted))  # leave with an error
        staying = [s for s in running if id(s) not in exhausted]
        if memory.blocked is not None:  # admission ran: drain for whoever starves now
            draining = choose_drains(memory.blocked, staying, waiting, memory,
                                     draining=draining,
                                     is_starving=self._is_starving(step_no))  # fmt: skip
        return draining & {s.adapter_id for s in staying}

    def _still_draining(
        self, running: list[Sequence], waiting: deque[Sequence], step_no: int
    ) -> frozenset[AdapterId]:
        """Drains that still serve a starving request: adapters that have left are done, one
        with a starving request of its own takes it, and all end once nobody outside the batch
        starves."""
        if not self.draining:
            return self.draining
        in_batch = {s.adapter_id for s in running}
        is_starving = self._is_starving(step_no)
        starving = {s.adapter_id for s in waiting if s.adapter_id is not None and is_starving(s)}
        if not starving - in_batch:
            return frozenset()
        return frozenset(self.draining & in_batch - starving)

    def _is_starving(self, step_no: int) -> Callable[[Sequence], bool]:
        bound = self.limits.starvation_steps
        return lambda seq: step_no - seq.waiting_since_step >= bound

    def gpu_adapters(self) -> tuple[GpuAdapter, ...]:
        """Resident (or once evicted) adapters, for stats; rebuilt only when residency changed."""
        residency = self.residency
        if self._gpu_snapshot[0] != residency.version:
            ids = residency.entries.keys() | residency.num_evictions.keys()
            gpu = tuple(
                GpuAdapter(a, len(residency.rows_of(a) or ()), residency.num_evictions[a])
                for a in sorted(ids)
            )
            self._gpu_snapshot = (residency.version, gpu)
        return self._gpu_snapshot[1]

    def memory_stats(self) -> SchedulerStats:
        """The arena's pages and rows, the prefix cache and the adapters, for stats."""
        arena = self.arena
        return SchedulerStats(
            num_kv_pages=arena.geometry.num_pages,
            num_kv_pages_used=arena.num_used_pages - arena.num_evictable_pages,
            num_cached_pages=self.cache.num_pages,
            num_cached_pages_evicted=self.cache.num_evicted,
            num_lora_rows=arena.geometry.max_rows - arena.first_row,
            num_lora_rows_used=arena.num_used_rows,
            lora_capacity=self.capacity,
            gpu_adapters=self.gpu_adapters(),
        )

    def retire(self, adapter_id: AdapterId) -> None:
        """Unloaded and drained: its rows go at the next plan, its cached pages now."""
        self.residency.retire(adapter_id)
        self.cache.drop_adapter(adapter_id)

    def check_invariants(self, running: Seq[Sequence]) -> None:
        """Tables agree, and every running sequence's adapter is resident."""
        self.arena.check_invariants()
        self.residency.check_invariants()
        self.cache.check_invariants(running)
        for seq in running:
            if seq.adapter_id is not None:
                assert self.residency.is_resident(seq.adapter_id), f"{seq.request_id}: adapter"

    def _rows(self, adapter_id: AdapterId) -> tuple[int, ...]:
        rows = self.residency.rows_of(adapter_id)
        assert rows is not None, f"adapter id {adapter_id} planned without rows"
        return rows
