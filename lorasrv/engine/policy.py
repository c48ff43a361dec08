"""Batch planning: which rows run in the next step, with how many tokens. Pure: no asyncio, torch.

Rules: running rows first (oldest first), then waiting ones first-come-first-served, within the
token budget, the free KV pages, `max_running_requests` and adapter capacity (batch_adapters.py:
when it binds, cheap adapters first, with a bounded wait). A waiting request starts with its
cached prefix in place (prefix_pages.py) and prefills only the rest. Rows that do not fit wait;
they are never dropped. When pages run out, cached pages nobody holds are evicted first, then
idle adapters' rows are reclaimed, then the newest running rows are preempted (pages released,
recomputed later: from their cached pages when those are still there). As in SGLang, a step is
prefill-only or decode-only unless mixed chunks are enabled: pure decode steps replay CUDA
graphs, mixed ones cannot. Tokens still in flight (`Sequence.num_pending`) count as the
sequence's own: a row never goes past max_new_tokens or the context counting them, and a
sequence waits for them before it is admitted again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from lorasrv.engine.admission import admission_order
from lorasrv.engine.arena import pages_needed
from lorasrv.engine.batch_adapters import BatchAdapters
from lorasrv.engine.prefix_pages import PrefixPages
from lorasrv.engine.sequence import SeqStatus, Sequence


class PlanLimits(NamedTuple):
    token_budget: int  # tokens in one step (chunked prefill size)
    max_running: int  # sequences holding pages at once
    page_size: int
    context_length: int
    starvation_steps: int = 16  # after this many skipped steps, an adapter's request jumps the line
    mixed_chunk: bool = False  # prefill chunks and decode rows in one step (--enable-mixed-chunk)


class Row(NamedTuple):
    seq: Sequence
    num_new: int  # tokens computed for it this step

    @property
    def is_sampled(self) -> bool:
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


class BatchDecision(NamedTuple):
    rows: list[Row]
    preempted: list[Sequence]
    exhausted: list[Sequence]  # can never get the pages it needs: must finish
    is_prefill_only: bool = False


def plan_batch(
    running: list[Sequence],
    waiting: deque[Sequence],
    memory: BatchAdapters,
    limits: PlanLimits,
    step_no: int,
    *,
    prefill_turn: bool = True,
    cache: PrefixPages | None = None,
) -> BatchDecision:
    """Choose rows and allocate their pages (and their adapters' rows, through `memory`).
    Mutates `running`, `waiting`, the arena, the prefix cache and seq.blocks.

    Preempted sequences go back to the front of `waiting` with their pages released. Without mixed
    chunks, prefill work (new requests, unfinished chunks) gets a prefill-only step when
    `prefill_turn` (the scheduler clears it after a prefill-only step, so decoding rows advance
    at least every other step); otherwise the step decodes.
    """
    if cache is None:  # no prefix cache: every page is a sequence's own
        cache = PrefixPages(memory.residency.arena, limits.page_size, enabled=False)
    return _plan_rows(running, waiting, memory, cache, limits, step_no, prefill_turn)


def _plan_rows(
    running: list[Sequence],
    waiting: deque[Sequence],
    memory: BatchAdapters,
    cache: PrefixPages,
    limits: PlanLimits,
    step_no: int,
    prefill_turn: bool,
) -> BatchDecision:
    plan = _Planning(running, waiting, memory, cache, limits, step_no)
    context_length = limits.context_length

    def is_decode(seq: Sequence) -> bool:
        return seq.is_decode and seq.can_grow(context_length)

    if limits.mixed_chunk:
        return plan.run(lambda seq: seq.can_grow(context_length), admit=True)
    has_decode = any(map(is_decode, running))
    has_prefill = bool(waiting) or any(not seq.is_decode for seq in running)
    if has_prefill and (prefill_turn or not has_decode):
        first = plan.run(_is_prefill, admit=True)
        if first.rows or first.exhausted or not has_decode:
            return first._replace(is_prefill_only=bool(first.rows))
        second = plan.run(is_decode, admit=False)
        return second._replace(preempted=first.preempted + second.preempted)
    return plan.run(is_decode, admit=False)


def _is_prefill(seq: Sequence) -> bool:
    return not seq.is_decode  # no token in flight: it can grow


class _Planning:
    """One call of plan_batch: the queues, the memory and the limits it plans against."""

    def __init__(
        self,
        running: list[Sequence],
        waiting: deque[Sequence],
        memory: BatchAdapters,
        cache: PrefixPages,
        limits: PlanLimits,
        step_no: int,
    ) -> None:
        self.running, self.waiting, self.memory, self.cache = running, waiting, memory, cache
        self.limits, self.step_no = limits, step_no

    def run(self, wanted: Callable[[Sequence], bool], *, admit: bool) -> BatchDecision:
        running = self.running
        budget = self.limits.token_budget
        rows: list[Row] = []
        preempted: list[Sequence] = []
        exhausted: list[Sequence] = []
        scheduled: set[int] = set()
        index = 0
        while index < len(running) and budget > 0:
            seq = running[index]
            if not wanted(seq):
                index += 1
                continue
            num_new = min(seq.num_uncomputed, budget)
            if not self.reserve_pages(seq, num_new):
                if not scheduled and len(running) == 1:
                    exhausted.append(seq)  # nobody else holds pages: it can never grow
                    index += 1
                    continue
                victim = _pick_victim(running, index, scheduled)
                self.preempt(victim)
                preempted.append(victim)
                continue  # `index` now points at the next sequence, or retries this one
            rows.append(Row(seq, num_new))
            scheduled.add(seq.seq_id)
            budget -= num_new
            index += 1
        if admit and not exhausted:
            self.admit(rows, budget, exhausted)
        return BatchDecision(rows, preempted, exhausted)

    def admit(self, rows: list[Row], budget: int, exhausted: list[Sequence]) -> None:
        """Waiting requests join, first come first served; when adapter capacity binds, in
        admission.py's order. A starving request that finds no capacity goes to
        `memory.blocked` (the planner drains running adapters for it), and no adapter outside
        the batch joins after it: what frees up is its."""
        memory, limits, running = self.memory, self.limits, self.running
        order = list(self.waiting)
        if memory.binds(order):
            order = admission_order(order, memory, self.is_starving)
        admitted: set[int] = set()
        memory.blocked = []
        for seq in order:
            if budget <= 0 or len(running) >= limits.max_running:
                break
            if seq.num_pending:
                continue  # preempted with tokens in flight: it needs them before it runs again
            if (memory.blocked and memory.cost(seq) > 0) or not memory.fits(seq):
                if self.is_starving(seq) and memory.cost(seq) > 0:
                    memory.blocked.append(seq)
                continue
            if self.cache.waits_for_shared_prefix(seq):
                continue  # pages of its prompt are being computed: it reads them once cached
            memory.take(seq)  # rows first: the pages must fit beside them
            self.cache.admit(seq)  # then its cached prefix, held so nothing evicts it
            num_new = min(seq.num_uncomputed, budget)
            if not self.reserve_pages(seq, num_new):
                self.cache.release(seq)
                if not running:  # nothing holds pages it could wait for: it never fits
                    exhausted.append(seq)
                break  # first come, first served: nobody overtakes on pages
            self.cache.admitted(seq)
            seq.status = SeqStatus.RUNNING
            running.append(seq)
            rows.append(Row(seq, num_new))
            admitted.add(seq.seq_id)
            budget -= num_new
        if admitted:
            kept = [s for s in self.waiting if s.seq_id not in admitted]
            self.waiting.clear()
            self.waiting.extend(kept)

    def is_starving(self, seq: Sequence) -> bool:
        return self.step_no - seq.waiting_since_step >= self.limits.starvation_steps

    def reserve_pages(self, seq: Sequence, num_new: int) -> bool:
        missing = pages_needed(seq.num_computed + num_new, self.limits.page_size) - len(seq.blocks)
        if missing <= 0:
            return True
        arena = self.memory.residency.arena
        if not arena.can_allocate(missing):  # cached pages nobody holds go first
            self.cache.evict(missing - arena.num_free_pages)
        if not arena.can_allocate(missing):
            # KV demand comes before idle adapters: reclaim their rows before preempting.
            memory = self.memory
            if not memory.residency.reclaim_pages(missing, memory.protected, memory.wanted):
                return False
        seq.blocks.extend(arena.allocate(missing))
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.release(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)


def _pick_victim(running: list[Sequence], index: int, scheduled: set[int]) -> Sequence:
    """The newest running sequence not already in this step (possibly the one at `index`)."""
    for seq in reversed(running[index:]):
        if seq.seq_id not in scheduled:
            return seq
    return running[index]
