"""plan_batch: budgets, pages, adapter capacity, preemption and fairness, as plain functions,
over a real arena (pages only unless a test gives rows)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from lorasrv.engine.arena import Arena, ArenaGeometry, Floors
from lorasrv.engine.batch_adapters import BatchAdapters
from lorasrv.engine.policy import BatchDecision, PlanLimits
from lorasrv.engine.policy import plan_batch as _plan_batch
from lorasrv.engine.residency import Residency
from lorasrv.engine.sequence import SeqStatus, Sequence
from lorasrv.ids import AdapterId, RequestId, SeqId
from lorasrv.messages import SamplingParams

LIMITS = PlanLimits(token_budget=16, max_running=8, page_size=4, context_length=128)


class Pool:
    """A page-only arena (rows too, when asked) with its residency table, as the planner has."""

    def __init__(self, num_pages: int, rows: int = 64, cap: int | None = 2) -> None:
        geometry = ArenaGeometry(num_pages + rows, 10, 10 if rows else 0, rows)
        # the rows sit on pages of their own above `num_pages`: the floors keep them apart
        self.arena = Arena(geometry, Floors(num_pages, rows))
        self.residency = Residency(self.arena, "lru")
        self.cap = cap
        self.latest: frozenset[AdapterId] = frozenset()

    @property
    def num_free(self) -> int:
        return self.arena.num_free_pages

    def free(self, pages: Iterable[Any]) -> None:
        self.arena.free(pages)


def plan_batch(
    running: list[Sequence],
    waiting: deque[Sequence],
    pool: Pool,
    limits: PlanLimits,
    step_no: int,
    *,
    prefill_turn: bool = True,
) -> BatchDecision:
    memory = BatchAdapters(
        pool.residency, cap=pool.cap, latest=pool.latest, running=running, waiting=waiting
    )
    decision = _plan_batch(running, waiting, memory, limits, step_no, prefill_turn=prefill_turn)
    pool.arena.check_invariants()
    pool.residency.check_invariants()
    return decision


def make_seq(i: int, prompt_len: int = 5, adapter: int | None = None, rank: int = 4) -> Sequence:
    seq = Sequence(
        seq_id=SeqId(i),
        request_id=RequestId(f"r{i}"),
        prompt_ids=tuple(range(1, prompt_len + 1)),
        params=SamplingParams(),
        adapter_id=None if adapter is None else AdapterId(adapter),
        adapter_rank=0 if adapter is None else rank,
    )
    seq.status = SeqStatus.WAITING
    return seq


def run_rows(decision_rows: list) -> None:  # type: ignore[type-arg]
    """Commit a step as the scheduler does, and sample one token for sampled rows."""
    for row in decision_rows:
        sampled = row.is_sampled
        row.seq.num_computed += row.num_new
        if sampled:
            row.seq.output_ids.append(7)


def test_chunked_prefill_respects_token_budget() -> None:
    pool = Pool(32)
    running: list[Sequence] = []
    waiting = deque([make_seq(0, prompt_len=40)])
    decision = plan_batch(running, waiting, pool, LIMITS, 0)
    assert [(r.seq.seq_id, r.num_new) for r in decision.rows] == [(0, 16)]
    assert not decision.rows[0].is_sampled
    assert len(running[0].blocks) == 4  # 16 tokens / page 4
    run_rows(decision.rows)
    second = plan_batch(running, waiting, pool, LIMITS, 1)
    assert second.rows[0].num_new == 16
    run_rows(second.rows)
    third = plan_batch(running, waiting, pool, LIMITS, 2)
    assert third.rows[0].num_new == 8
    assert third.rows[0].is_sampled


def test_mixed_chunk_puts_decode_rows_before_new_prefills() -> None:
    limits = LIMITS._replace(mixed_chunk=True)
    pool = Pool(32)
    running: list[Sequence] = []
    waiting = deque([make_seq(0), make_seq(1, prompt_len=20)])
    run_rows(plan_batch(running, waiting, pool, limits, 0).rows)
    decision = plan_batch(running, waiting, pool, limits, 1)
    # seq 0 decodes (1 token); seq 1 finishes its prefill with what is left of the budget
    assert [(r.seq.seq_id, r.num_new) for r in decision.rows] == [(0, 1), (1, 9)]


def test_without_mixed_chunk_steps_are_prefill_or_decode_and_alternate() -> None:
    pool = Pool(64)
    running: list[Sequence] = []
    waiting = deque([make_seq(0), make_seq(1)])
    first = plan_batch(running, waiting, pool, LIMITS, 0)
    assert first.is_prefill_only
    assert [r.seq.seq_id for r in first.rows] == [0, 1]
    run_rows(first.rows)
    waiting.append(make_seq(2))  # arrives while 0 and 1 decode
    second = plan_batch(running, waiting, pool, LIMITS, 1, prefill_turn=True)
    assert second.is_prefill_only
    assert [(r.seq.seq_id, r.num_new) for r in second.rows] == [(2, 5)]
    run_rows(second.rows)
    waiting.append(make_seq(3))
    # right after a prefill-only step, decoding rows go first even though seq 3 waits
    third = plan_batch(running, waiting, pool, LIMITS, 2, prefill_turn=False)
    assert not third.is_prefill_only
    assert [(r.seq.seq_id, r.num_new) for r in third.rows] == [(0, 1), (1, 1), (2, 1)]
    assert [s.seq_id for s in waiting] == [3]


def test_prefill_step_keeps_slots_of_adapters_that_are_decoding() -> None:
    pool = Pool(64)
    running: list[Sequence] = []
    waiting = deque([make_seq(0, 2, adapter=1), make_seq(1, 2, adapter=2)])
    run_rows(plan_batch(running, waiting, pool, LIMITS, 0).rows)  # both slots now in use
    waiting.append(make_seq(2, 2, adapter=3))
    waiting.append(make_seq(3, 2))
    decision = plan_batch(running, waiting, pool, LIMITS, 1, prefill_turn=True)
    # adapter 3 would evict a slot still decoding: it waits; the base request is admitted
    assert [r.seq.seq_id for r in decision.rows] == [3]
    assert [s.seq_id for s in waiting] == [2]


def test_adapter_slots_limit_distinct_adapters() -> None:
    pool = Pool(32)
    running: list[Sequence] = []
    waiting = deque([make_seq(0, 2, adapter=1), make_seq(1, 2, adapter=2), make_seq(2, 2, 3),
                     make_seq(3, 2, adapter=1), make_seq(4, 2)])  # fmt: skip
    decision = plan_batch(running, waiting, pool, LIMITS, 0)
    # capacity binds: the base row costs nothing and goes first; then adapter 1, two requests
    # waiting, as one group; then adapter 2; adapter 3 has no room left
    assert [r.seq.seq_id for r in decision.rows] == [4, 0, 3, 1]
    assert [s.seq_id for s in waiting] == [2]  # waits, never dropped


def test_preempts_newest_when_pages_run_out() -> None:
    pool = Pool(4)  # 16 tokens of KV
    running: list[Sequence] = []
    waiting = deque([make_seq(0, prompt_len=8), make_seq(1, prompt_len=8)])
    run_rows(plan_batch(running, waiting, pool, LIMITS, 0).rows)
    assert pool.num_free == 0
    decision = plan_batch(running, waiting, pool, LIMITS, 1)  # both need a 3rd page
    assert [s.seq_id for s in decision.preempted] == [1]
    assert [r.seq.seq_id for r in decision.rows] == [0]
    victim = waiting[0]
    assert victim.seq_id == 1
    assert victim.num_computed == 0
    assert not victim.blocks
    assert victim.output_ids == [7]  # kept: recomputed later, not lost


def test_lone_sequence_that_cannot_grow_is_exhausted() -> None:
    pool = Pool(2)
    running: list[Sequence] = []
    waiting = deque([make_seq(0, prompt_len=8)])
    run_rows(plan_batch(running, waiting, pool, LIMITS, 0).rows)
    decision = plan_batch(running, waiting, pool, LIMITS, 1)
    assert [s.seq_id for s in decision.exhausted] == [0]
    assert not decision.rows


def test_a_starving_request_without_a_place_blocks_nobody_and_is_reported() -> None:
    limits = LIMITS._replace(starvation_steps=3)
    pool = Pool(64, cap=1)
    running = [make_seq(0, 2, adapter=1)]
    running[0].status = SeqStatus.RUNNING
    pool.residency.place(AdapterId(1), 4, pinned=False, protected=())
    starving = make_seq(1, 2, adapter=2)
    starving.waiting_since_step = 0
    same_adapter = make_seq(2, 2, adapter=1)
    base = make_seq(3, 2)
    waiting = deque([starving, same_adapter, base])
    memory = BatchAdapters(pool.residency, cap=1, latest=frozenset(), running=running,
                           waiting=waiting)  # fmt: skip
    decision = _plan_batch(running, waiting, memory, limits, 5)
    # adapter 1 is in the batch: its request costs no place and joins, as does the base one;
    # the starving request found no place: the planner hears of it (to drain adapter 1)
    assert sorted(r.seq.seq_id for r in decision.rows) == [0, 2, 3]  # 0: its prompt
    assert memory.blocked == [starving]
    assert list(waiting) == [starving]


def test_a_draining_adapter_takes_no_new_request() -> None:
    pool = Pool(64, cap=2)
    running = [make_seq(0, 2, adapter=1)]
    running[0].status = SeqStatus.RUNNING
    pool.residency.place(AdapterId(1), 4, pinned=False, protected=())
    waiting = deque([make_seq(1, 2, adapter=1), make_seq(2, 2, adapter=2)])
    memory = BatchAdapters(pool.residency, cap=2, latest=frozenset(), running=running,
                           waiting=waiting, draining=frozenset({AdapterId(1)}))  # fmt: skip
    decision = _plan_batch(running, waiting, memory, LIMITS, 1)
    assert [r.seq.seq_id for r in decision.rows] == [0, 2]  # 0: its prompt
    assert [s.seq_id for s in waiting] == [1]
    assert memory.blocked == []  # nobody starves


def test_max_running_caps_admission() -> None:
    limits = LIMITS._replace(max_running=2)
    waiting = deque([make_seq(i, 2) for i in range(4)])
    running: list[Sequence] = []
    plan_batch(running, waiting, Pool(32), limits, 0)
    assert len(running) == 2
    assert len(waiting) == 2


def test_a_token_in_flight_is_decoded_before_it_reaches_the_host() -> None:
    pool = Pool(8)
    running: list[Sequence] = []
    waiting = deque([make_seq(0, prompt_len=7)])
    prefill = plan_batch(running, waiting, pool, LIMITS, 0)
    seq = running[0]
    seq.num_computed += prefill.rows[0].num_new
    seq.num_pending = 1  # its first token is sampled by the prefill, still in flight
    decode = plan_batch(running, waiting, pool, LIMITS, 1, prefill_turn=False)
    assert [(r.seq.seq_id, r.num_new) for r in decode.rows] == [(0, 1)]
    assert decode.rows[0].is_sampled
    assert len(seq.blocks) == 2  # position 7: page 1, the page it already holds


def test_a_row_whose_last_token_is_in_flight_gets_no_step() -> None:
    limits = LIMITS._replace(context_length=10)
    pool = Pool(8)
    running: list[Sequence] = []
    waiting = deque([make_seq(0, prompt_len=4), make_seq(1, prompt_len=4)])
    waiting[0].params = SamplingParams(max_new_tokens=2)
    run_rows(plan_batch(running, waiting, pool, limits, 0).rows)  # one token each, on the host
    by_length, by_context = running
    by_length.num_computed = 5  # the step that computed its first token samples its second,
    by_length.num_pending = 1  # its last: on its way
    by_context.output_ids.extend([7] * 4)  # 9 tokens, the 10th on its way: the context is full
    by_context.num_computed = 9
    by_context.num_pending = 1
    decision = plan_batch(running, waiting, pool, limits, 1, prefill_turn=False)
    assert decision.rows == []
    by_length.params = SamplingParams(max_new_tokens=3)  # had it one more to give: a step
    decision = plan_batch(running, waiting, pool, limits, 2, prefill_turn=False)
    assert [(r.seq.seq_id, r.num_new) for r in decision.rows] == [(0, 1)]


def test_a_preempted_sequence_waits_for_its_token_in_flight() -> None:
    pool = Pool(8)
    seq = make_seq(0)
    seq.output_ids.append(7)
    seq.num_pending = 1  # preempted while a step sampled it
    other = make_seq(1)
    waiting = deque([seq, other])
    running: list[Sequence] = []
    decision = plan_batch(running, waiting, pool, LIMITS, 0)
    assert [r.seq.seq_id for r in decision.rows] == [1]  # it does not hold the others back
    assert list(waiting) == [seq]
    run_rows(decision.rows)
    seq.num_pending = 0
    seq.output_ids.append(8)
    decision = plan_batch(running, waiting, pool, LIMITS, 1)
    assert [(r.seq.seq_id, r.num_new) for r in decision.rows] == [(0, 7)]  # prompt + 2 outputs


def test_decode_rows_hold_only_the_pages_they_write() -> None:
    pool = Pool(8)
    running: list[Sequence] = []
    waiting = deque([make_seq(0, prompt_len=7)])
    run_rows(plan_batch(running, waiting, pool, LIMITS, 0).rows)
    plan_batch(running, waiting, pool, LIMITS, 1, prefill_turn=False)
    assert len(running[0].blocks) == 2
