"""Adapter-aware admission when capacity binds (engine/admission.py), rule by rule: through the
planner (cap, rows, plans run step by step) and as pure functions; and the bounded wait under a
random stream of requests."""

from __future__ import annotations

import random
from collections.abc import Iterable

from lorasrv.engine import admission
from lorasrv.engine.admission import admission_order, choose_drains
from lorasrv.engine.sequence import SeqStatus, Sequence
from lorasrv.ids import AdapterId
from tests.unit.planner_fixtures import Queues, ids, planner, seq


def finish_done(q: Queues) -> None:
    """Sequences that sampled their last token leave, as the scheduler's stop rule does."""
    for s in [s for s in q.running if len(s.output_ids) >= s.params.max_new_tokens]:
        q.finish(s)


def arrive(q: Queues, *seqs: Sequence) -> None:
    for s in seqs:
        s.waiting_since_step = q.step_no
        q.waiting.append(s)


def running_adapters(q: Queues) -> set[int]:
    return {int(s.adapter_id) for s in q.running if s.adapter_id is not None}


def test_requests_of_adapters_in_the_batch_join_while_another_starves() -> None:
    # cap 1: adapter 1 runs; a request for adapter 2 starves. Adapter 1's new request costs no
    # place and joins (it used to be held back by the starving one, shrinking the batch).
    q = Queues(planner(cap=1, starve=2))
    arrive(q, seq(0, adapter=1, new=20))
    q.plan()
    arrive(q, seq(1, adapter=2))
    for _ in range(3):
        q.plan(prefill_turn=False)
    arrive(q, seq(2, adapter=1, new=20))
    planned = q.plan()
    assert ids(planned) == [2]
    assert [s.seq_id for s in q.waiting] == [1]


def test_a_freed_place_goes_to_the_adapter_with_the_most_waiting_requests() -> None:
    q = Queues(planner(cap=1, starve=100))
    arrive(q, seq(0, adapter=1, new=1))
    q.plan()
    arrive(q, seq(1, adapter=2), seq(2, adapter=3), seq(3, adapter=3))
    finish_done(q)
    planned = q.plan()
    assert ids(planned) == [2, 3]  # adapter 3's two requests, though adapter 2's came first
    assert [s.seq_id for s in q.waiting] == [1]


def test_a_starving_adapter_goes_before_larger_groups() -> None:
    q = Queues(planner(cap=1, starve=3))
    arrive(q, seq(0, adapter=1, new=6))
    q.plan()
    arrive(q, seq(1, adapter=2))
    for _ in range(4):
        q.plan(prefill_turn=False)
    arrive(q, seq(2, adapter=3), seq(3, adapter=3))
    q.plan(prefill_turn=False)
    finish_done(q)
    planned = q.plan()
    assert ids(planned) == [1]


def test_a_starving_request_drains_the_running_adapter_that_finishes_soonest() -> None:
    q = Queues(planner(cap=2, starve=2))
    arrive(q, seq(0, adapter=1, new=4), seq(1, adapter=2, new=20))
    q.plan()
    arrive(q, seq(2, adapter=3))
    for _ in range(3):
        q.plan(prefill_turn=False)
    q.plan()  # admission: adapter 3 starves, no place: adapter 1 ends first, so it drains
    assert q.p.draining == {AdapterId(1)}
    arrive(q, seq(3, adapter=1, new=20), seq(4, adapter=2, new=20))
    planned = q.plan()
    assert ids(planned) == [4]  # adapter 2 still takes requests, adapter 1 none
    for turn in range(6):
        finish_done(q)
        q.plan(prefill_turn=turn % 2 == 0)
    assert running_adapters(q) == {2, 3}  # adapter 1 left; adapter 3 took its place
    assert [s.seq_id for s in q.waiting] == [3]
    # adapter 1's request has starved meanwhile: adapter 2 drains for it now
    assert q.p.draining == {AdapterId(2)}


def test_an_adapter_with_a_starving_request_never_drains() -> None:
    q = Queues(planner(cap=2, starve=2))
    arrive(q, seq(0, adapter=1, new=4), seq(1, adapter=2, new=20))
    q.plan()
    q.p.draining = frozenset({AdapterId(1)})
    arrive(q, seq(2, adapter=3), seq(3, adapter=1))
    for _ in range(3):
        q.plan(prefill_turn=False)
    planned = q.plan()  # adapter 1's own request starves now: it joins, and 2 drains instead
    assert 3 in ids(planned)
    assert q.p.draining == {AdapterId(2)}


def test_a_drain_ends_when_no_starving_request_needs_it() -> None:
    q = Queues(planner(cap=1, starve=2))
    arrive(q, seq(0, adapter=1, new=20))
    q.plan()
    starving = seq(1, adapter=2)
    arrive(q, starving)
    for _ in range(3):
        q.plan(prefill_turn=False)
    q.plan()
    assert q.p.draining == {AdapterId(1)}
    q.waiting.remove(starving)  # aborted
    arrive(q, seq(2, adapter=1, new=20))
    planned = q.plan()
    assert ids(planned) == [2]
    assert not q.p.draining


def test_memory_bound_batches_drain_for_rows() -> None:
    # 32 pages: 24 rows above the KV floor, three rank-8 adapters; no cap
    q = Queues(planner(num_pages=32, starve=2))
    arrive(q, seq(0, adapter=1, new=4), seq(1, adapter=2, new=9), seq(2, adapter=3, new=9))
    q.plan()
    arrive(q, seq(3, adapter=4, new=2))
    for _ in range(3):
        q.plan(prefill_turn=False)
    q.plan()
    assert q.p.draining == {AdapterId(1)}
    arrive(q, seq(4, adapter=1, new=2))
    seen: list[set[int]] = []
    for turn in range(6):
        finish_done(q)
        q.plan(prefill_turn=turn % 2 == 0)
        seen.append(running_adapters(q))
    # adapter 1 left and its rows went to adapter 4; adapter 1's new request came after it
    first_4 = next(i for i, adapters in enumerate(seen) if 4 in adapters)
    first_1 = next(i for i, adapters in enumerate(seen) if 1 in adapters)
    assert first_4 < first_1


def test_every_request_runs_within_a_bounded_wait_under_random_load() -> None:
    """Cap 2 over 5 adapters (and base), requests of 2-6 tokens arriving every plan: each one
    runs within starvation_steps plus a few places' turnovers, whatever the mix."""
    starve = 6
    for trial in range(8):
        rng = random.Random(trial)
        q = Queues(planner(num_pages=200, cap=2, starve=starve, max_running=8))
        started: dict[int, int] = {}
        arrived: dict[int, int] = {}
        for step in range(300):
            if step < 240 and rng.random() < 0.7:
                s = seq(len(arrived), adapter=rng.choice([None, 1, 1, 1, 2, 2, 3, 4, 5]),
                        rank=rng.choice([1, 2, 4]), new=rng.randint(2, 6))  # fmt: skip
                arrived[int(s.seq_id)] = q.step_no
                arrive(q, s)
            q.plan(prefill_turn=step % 2 == 0)
            for s in q.running:
                started.setdefault(int(s.seq_id), q.step_no)
            finish_done(q)
        assert set(started) == set(arrived), f"trial {trial}: requests never ran"
        waits = [started[i] - arrived[i] for i in arrived]
        # after starving: the older starving adapters (at most 4) each need a place, and a
        # place turns over within a request's length (6) plus its prefill, every other plan
        assert max(waits) <= starve + 4 * 2 * (6 + 2), (trial, max(waits))


# ----------------------------------------------------------------------------- pure


class FakeCapacity:
    def __init__(
        self,
        cap: int | None,
        *,
        in_batch: Iterable[int] = (),
        resident: Iterable[int] = (),
        rows: int = 0,
        place_rows: int = 8,
    ) -> None:
        self.cap = cap
        self.in_batch = {AdapterId(a) for a in in_batch}
        self.resident = {AdapterId(a) for a in resident}
        self.rows, self.rows_each = rows, place_rows

    def cost(self, s: Sequence) -> int:
        if s.adapter_id is None or s.adapter_id in self.in_batch:
            return 0
        return 1 if s.adapter_id in self.resident else 2

    def place_rows(self, adapter_id: AdapterId) -> int:
        return self.rows_each

    def obtainable_rows(self) -> int:
        return self.rows


def waiting_seq(i: int, adapter: int | None, since: int, rank: int = 8) -> Sequence:
    s = seq(i, adapter=adapter, rank=rank)
    s.waiting_since_step = since
    return s


def test_admission_order_tiers() -> None:
    memory = FakeCapacity(cap=4, in_batch=[1], resident=[3])
    waiting = [
        waiting_seq(0, 2, since=9),  # a group of one, to upload
        waiting_seq(1, 1, since=9),  # in the batch
        waiting_seq(2, 3, since=9),  # resident, two waiting: before adapter 4's two (uploads)
        waiting_seq(3, 4, since=8),
        waiting_seq(4, 3, since=9),
        waiting_seq(5, 4, since=9),
        waiting_seq(6, 5, since=0),  # starving
        waiting_seq(7, None, since=9),
        waiting_seq(8, 1, since=0),  # starving, in the batch: first of all
    ]
    order = admission_order(waiting, memory, lambda s: s.waiting_since_step < 5)
    assert [int(s.seq_id) for s in order] == [8, 6, 1, 7, 2, 4, 3, 5, 0]


def test_starving_adapters_go_first_for_half_the_places_only() -> None:
    memory = FakeCapacity(cap=4)
    waiting = [waiting_seq(i, 10 + i, since=i) for i in range(4)]  # four starving adapters
    waiting += [waiting_seq(10, 20, since=9), waiting_seq(11, 20, since=9)]  # a group of two
    order = admission_order(waiting, memory, lambda s: s.waiting_since_step < 5)
    # the two oldest starving adapters (cap 4: half), then the largest group, then the rest
    assert [int(s.seq_id) for s in order] == [0, 1, 10, 11, 2, 3]
    assert admission.starving_places(None) == 4
    assert admission.starving_places(1) == 1


def running_seq(i: int, adapter: int, left: int) -> Sequence:
    s = seq(i, adapter=adapter, new=left + 1)
    s.status = SeqStatus.RUNNING
    s.num_computed = 4
    s.output_ids = [5]
    return s


def test_choose_drains() -> None:
    running = [running_seq(0, 1, left=9), running_seq(1, 2, left=3), running_seq(2, 2, left=5),
               running_seq(3, 3, left=4)]  # fmt: skip
    starving = waiting_seq(9, 7, since=0)
    is_starving = lambda s: s.waiting_since_step < 5  # noqa: E731
    full = FakeCapacity(cap=3, in_batch=[1, 2, 3])

    def drains(blocked: list[Sequence], memory: FakeCapacity, draining: Iterable[int] = (),
               waiting: Iterable[Sequence] = ()) -> set[int]:  # fmt: skip
        chosen = choose_drains(blocked, running, [*blocked, *waiting], memory,
                               draining={AdapterId(a) for a in draining},
                               is_starving=is_starving)  # fmt: skip
        return {int(a) for a in chosen}

    assert drains([], full) == set()  # nobody starves: nobody drains
    assert drains([starving], full) == {3}  # its last request ends first (4 steps)
    assert drains([starving], full, draining=[1]) == {1}  # a drain under way goes on
    assert drains([starving], full, waiting=[waiting_seq(8, 3, since=0)]) == {2}  # 3 starves
    # memory-bound: drains only while the starving adapter's rows are short
    assert drains([starving], FakeCapacity(cap=None, rows=8)) == set()
    assert drains([starving], FakeCapacity(cap=None, rows=4)) == {3}
