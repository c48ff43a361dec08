"""Batch planning: which rows run in the next step, with how many tokens. Pure: no asyncio, torch.

Rules: running rows first (oldest first), then waiting ones first-come-first-served, within the
token budget, the free KV pages, `max_running_requests` and the adapter slots. Rows that do not
fit wait; they are never dropped. When pages run out, the newest running rows are preempted
(pages freed, recomputed later). As in SGLang, a step is prefill-only or decode-only unless
mixed chunks are enabled: pure decode steps replay CUDA graphs, mixed ones cannot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from lorasrv.engine.block_pool import BlockPool, pages_needed
from lorasrv.engine.sequence import SeqStatus, Sequence
from lorasrv.ids import AdapterId


class PlanLimits(NamedTuple):
    token_budget: int  # tokens in one step (chunked prefill size)
    max_running: int  # sequences holding pages at once
    num_slots: int  # GPU LoRA slots (max_loras_per_batch)
    num_pinned: int  # slots held by pinned adapters
    page_size: int
    context_length: int
    starvation_steps: int = 16  # after this many skipped steps, an adapter's request jumps the line
    mixed_chunk: bool = False  # prefill chunks and decode rows in one step (--enable-mixed-chunk)
    # Decode steps also give each row the page of its next token, when free pages allow, so the
    # runner can launch that step before this one's tokens are back (the overlap schedule).
    lookahead: bool = False


class Row(NamedTuple):
    seq: Sequence
    num_new: int  # tokens computed for it this step

    @property
    def is_sampled(self) -> bool:
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


class BatchDecision(NamedTuple):
    rows: list[Row]
    preempted: list[Sequence]
    exhausted: list[Sequence]  # alone in the cache and still cannot grow: must finish
    is_prefill_only: bool = False


class _AdapterBudget:
    """Distinct unpinned adapters in the step must fit the slots pinned ones leave free."""

    __slots__ = ("adapters", "capacity")

    def __init__(self, limits: PlanLimits) -> None:
        self.capacity = max(0, limits.num_slots - limits.num_pinned)
        self.adapters: set[AdapterId] = set()

    def fits(self, seq: Sequence) -> bool:
        if seq.adapter_id is None or seq.is_pinned_adapter or seq.adapter_id in self.adapters:
            return True
        return len(self.adapters) < self.capacity

    def take(self, seq: Sequence) -> None:
        if seq.adapter_id is not None and not seq.is_pinned_adapter:
            self.adapters.add(seq.adapter_id)

    def has(self, seq: Sequence) -> bool:
        """Its adapter got a place (pinned and base rows always have one)."""
        return seq.adapter_id is None or seq.is_pinned_adapter or seq.adapter_id in self.adapters


def plan_batch(
    running: list[Sequence],
    waiting: deque[Sequence],
    pool: BlockPool,
    limits: PlanLimits,
    step_no: int,
    *,
    prefill_turn: bool = True,
) -> BatchDecision:
    """Choose rows and allocate their pages. Mutates `running`, `waiting`, the pool and seq.blocks.

    Preempted sequences go back to the front of `waiting` with their pages freed. Without mixed
    chunks, prefill work (new requests, unfinished chunks) gets a prefill-only step when
    `prefill_turn` (the scheduler clears it after a prefill-only step, so decoding rows advance
    at least every other step); otherwise the step decodes.
    """
    decision = _plan_rows(running, waiting, pool, limits, step_no, prefill_turn)
    if limits.lookahead and decision.rows and all(_is_decode(r.seq) for r in decision.rows):
        _reserve_next_token_pages(decision.rows, pool, limits)
    return decision


def _plan_rows(
    running: list[Sequence],
    waiting: deque[Sequence],
    pool: BlockPool,
    limits: PlanLimits,
    step_no: int,
    prefill_turn: bool,
) -> BatchDecision:
    if limits.mixed_chunk:
        return _plan(running, waiting, pool, limits, step_no, _any_row, admit=True)
    has_decode = any(_is_decode(seq) for seq in running)
    has_prefill = bool(waiting) or any(not _is_decode(seq) for seq in running)
    if has_prefill and (prefill_turn or not has_decode):
        first = _plan(running, waiting, pool, limits, step_no, _is_prefill, admit=True)
        if first.rows or first.exhausted or not has_decode:
            return first._replace(is_prefill_only=bool(first.rows))
        second = _plan(running, waiting, pool, limits, step_no, _is_decode, admit=False)
        return second._replace(preempted=first.preempted + second.preempted)
    return _plan(running, waiting, pool, limits, step_no, _is_decode, admit=False)


def _any_row(seq: Sequence) -> bool:
    return True


def _is_decode(seq: Sequence) -> bool:
    return seq.num_uncomputed == 1 and seq.num_computed > 0


def _is_prefill(seq: Sequence) -> bool:
    return not _is_decode(seq)


def _plan(
    running: list[Sequence],
    waiting: deque[Sequence],
    pool: BlockPool,
    limits: PlanLimits,
    step_no: int,
    wanted: Callable[[Sequence], bool],
    *,
    admit: bool,
) -> BatchDecision:
    budget = limits.token_budget
    adapters = _AdapterBudget(limits)
    for seq in running:
        # NOTE: every running sequence keeps its adapter's slot, even when this step skips it;
        # otherwise a prefill step could admit an adapter that evicts one still decoding.
        if adapters.fits(seq):
            adapters.take(seq)
    rows: list[Row] = []
    preempted: list[Sequence] = []
    exhausted: list[Sequence] = []
    scheduled: set[int] = set()
    index = 0
    while index < len(running) and budget > 0:
        seq = running[index]
        if not wanted(seq) or not adapters.has(seq):
            index += 1
            continue
        num_new = min(seq.num_uncomputed, budget)
        if not _reserve_pages(seq, num_new, pool, limits.page_size):
            if not scheduled and len(running) == 1:
                exhausted.append(seq)  # nobody else holds pages: it can never grow
                index += 1
                continue
            victim = _pick_victim(running, index, scheduled)
            _preempt(victim, running, waiting, pool)
            preempted.append(victim)
            continue  # `index` now points at the next sequence, or retries this one
        rows.append(Row(seq, num_new))
        scheduled.add(seq.seq_id)
        budget -= num_new
        index += 1
    if admit and not exhausted:
        _admit_waiting(running, waiting, pool, limits, adapters, rows, budget, step_no)
    return BatchDecision(rows, preempted, exhausted)


def _admit_waiting(
    running: list[Sequence],
    waiting: deque[Sequence],
    pool: BlockPool,
    limits: PlanLimits,
    adapters: _AdapterBudget,
    rows: list[Row],
    budget: int,
    step_no: int,
) -> None:
    held_back: list[Sequence] = []
    block_adapters = False  # a starving request reserves the next free slot
    while waiting and budget > 0 and len(running) < limits.max_running:
        seq = waiting.popleft()
        uses_slot = seq.adapter_id is not None and not seq.is_pinned_adapter
        if not adapters.fits(seq) or (block_adapters and uses_slot):
            held_back.append(seq)
            if step_no - seq.waiting_since_step >= limits.starvation_steps:
                block_adapters = True
            continue
        num_new = min(seq.num_uncomputed, budget)
        if not _reserve_pages(seq, num_new, pool, limits.page_size):
            waiting.appendleft(seq)  # first come, first served: nobody overtakes on pages
            break
        seq.status = SeqStatus.RUNNING
        running.append(seq)
        adapters.take(seq)
        rows.append(Row(seq, num_new))
        budget -= num_new
    waiting.extendleft(reversed(held_back))


def _reserve_pages(seq: Sequence, num_new: int, pool: BlockPool, page_size: int) -> bool:
    missing = pages_needed(seq.num_computed + num_new, page_size) - len(seq.blocks)
    if missing <= 0:
        return True
    if not pool.can_allocate(missing):
        return False
    seq.blocks.extend(pool.allocate(missing))
    return True


def _reserve_next_token_pages(rows: list[Row], pool: BlockPool, limits: PlanLimits) -> None:
    """Opportunistic: a row whose next token starts a page gets it now if one is free (it needs
    it next step anyway, unless it stops). Never preempts; rows left without one are simply
    not run ahead."""
    for row in rows:
        seq = row.seq
        next_len = seq.num_computed + row.num_new + 1  # tokens once the next step has run
        if next_len > limits.context_length:
            continue
        if pages_needed(next_len, limits.page_size) > len(seq.blocks) and pool.can_allocate(1):
            seq.blocks.extend(pool.allocate(1))


def _pick_victim(running: list[Sequence], index: int, scheduled: set[int]) -> Sequence:
    """The newest running sequence not already in this step (possibly the one at `index`)."""
    for seq in reversed(running[index:]):
        if seq.seq_id not in scheduled:
            return seq
    return running[index]


def _preempt(
    seq: Sequence, running: list[Sequence], waiting: deque[Sequence], pool: BlockPool
) -> None:
    running.remove(seq)
    pool.free(seq.blocks)
    seq.blocks.clear()
    seq.num_computed = 0
    seq.status = SeqStatus.WAITING
    seq.num_preemptions += 1
    waiting.appendleft(seq)
