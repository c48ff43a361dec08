"""The planner over one arena: adapters placed and uploaded as steps need them, evicted by policy,
reclaimed by KV demand, prefetched for queued requests, adapter-aware admission with its bounded
wait, and a hypothesis machine driving random enqueue/plan/finish/abort/retire through it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lorasrv.engine.arena import pages_needed
from lorasrv.engine.planner import Planner, effective_capacity
from lorasrv.engine.policy import PlanLimits
from lorasrv.engine.sequence import SeqStatus
from lorasrv.ids import AdapterId
from lorasrv.messages import AdapterRows, RunnerReady
from tests.unit.planner_fixtures import PAGE_SIZE, Queues, ids, planner, ready, seq


def test_a_step_uploads_the_adapters_it_brings_in_and_names_their_rows() -> None:
    q = Queues(planner())
    q.waiting.extend([seq(0, adapter=1, rank=8), seq(1, adapter=2, rank=3), seq(2)])
    planned = q.plan()
    assert ids(planned) == [0, 1, 2]
    assert [u.adapter_id for u in planned.uploads] == [1, 2]
    assert [len(u.rows) for u in planned.uploads] == [8, 3]
    assert set(planned.adapters) == set(planned.uploads)
    second = q.plan(prefill_turn=False)  # decode: resident now, nothing to upload
    assert second.uploads == ()
    assert second.adapters == planned.adapters


def test_rows_go_down_from_the_top_and_pages_up_from_the_bottom() -> None:
    q = Queues(planner(num_pages=100))
    q.waiting.extend([seq(0, adapter=1, rank=2)])
    planned = q.plan()
    assert planned.uploads == (AdapterRows(AdapterId(1), (98, 99)),)
    assert q.running[0].blocks == [0]  # the 4 prompt tokens: the lowest page


def test_cap_bounds_distinct_adapters_and_prefers_cheap_ones_when_it_binds() -> None:
    q = Queues(planner(cap=2))
    q.waiting.extend([seq(0, adapter=1), seq(1, adapter=2)])
    q.plan()
    q.finish(q.running[1])  # adapter 2 idles, still resident
    q.waiting.extend([seq(2, adapter=3), seq(3, adapter=2), seq(4, adapter=1)])
    planned = q.plan()
    # room for one more adapter: adapter 2 (resident) beats adapter 3 (first come, to upload);
    # a prefill-only step (seq 0 decodes in the next one)
    assert ids(planned) == [3, 4]
    assert [s.seq_id for s in q.waiting] == [2]
    # adapter 3 cannot run yet, but its upload rides along (prefetch): none for 3 or 4
    assert [u.adapter_id for u in planned.uploads] == [3]


def test_fcfs_when_capacity_does_not_bind() -> None:
    q = Queues(planner(budget=8))
    q.waiting.extend([seq(0, adapter=1), seq(1, adapter=2), seq(2, adapter=1)])
    planned = q.plan()  # 4 tokens each: the budget takes two, in arrival order
    assert ids(planned) == [0, 1]


def test_memory_bounds_the_batch_and_evicts_idle_adapters_by_policy() -> None:
    # 32 pages of 100 bytes, rows of 100 (row r over page r): KV keeps 8 pages (one context),
    # so 24 rows: three rank-8 adapters fit, a fourth needs an idle one's rows
    for policy, victim in (("lru", 2), ("fifo", 1)):
        q = Queues(planner(num_pages=32, policy=policy))
        q.waiting.extend([seq(0, adapter=1), seq(1, adapter=2), seq(2, adapter=3)])
        q.plan()
        for s in list(q.running):
            q.finish(s)
        q.waiting.append(seq(3, adapter=1))  # adapter 1 used again: most recently used
        q.plan()
        q.finish(q.running[0])
        q.waiting.append(seq(4, adapter=4))
        planned = q.plan()
        assert [u.adapter_id for u in planned.uploads] == [4]
        assert not q.p.residency.is_resident(AdapterId(victim))
        assert q.p.residency.num_evictions[AdapterId(victim)] == 1


def test_a_running_adapter_is_never_evicted_and_a_new_one_waits() -> None:
    q = Queues(planner(num_pages=32))
    q.waiting.extend([seq(0, adapter=1), seq(1, adapter=2), seq(2, adapter=3), seq(3, adapter=4)])
    planned = q.plan()
    assert ids(planned) == [0, 1, 2]  # the fourth rank-8 adapter has no rows
    assert [s.seq_id for s in q.waiting] == [3]
    q.finish(q.running[0])
    # adapter 1 is idle, but the latest plan used it while others still run: it stays a step
    assert ids(q.plan(prefill_turn=True)) == [1, 2]
    assert ids(q.plan(prefill_turn=True)) == [3]
    assert not q.p.residency.is_resident(AdapterId(1))
    assert [s.seq_id for s in q.running] == [1, 2, 3]


def test_kv_demand_reclaims_idle_adapters_before_preempting() -> None:
    # 40 pages; cap 1 keeps 8 rows (pages 32-39) for adapters, the KV floor 8 pages
    q = Queues(planner(num_pages=40, cap=1, budget=200))
    for adapter in (1, 2, 3):  # idle adapters over pages 16-39
        assert q.p.residency.place(AdapterId(adapter), 8, pinned=False, protected=())
    assert q.p.arena.num_free_pages == 16
    q.waiting.extend([seq(i, prompt=28) for i in range(4)])  # 7 pages each
    planned = q.plan()
    assert ids(planned) == [0, 1, 2, 3]
    assert not planned.decision.preempted
    # the two adapters over KV's share went; adapter 1, least recently used but in the
    # adapter floor, stays (evicting it would give KV nothing)
    assert sorted(q.p.residency.num_evictions) == [2, 3]
    assert q.p.residency.is_resident(AdapterId(1))


def test_prefetch_uploads_queued_adapters_with_a_decode_step_and_spares_wanted_ones() -> None:
    q = Queues(planner(cap=1))
    q.waiting.extend([seq(0, adapter=1), seq(1, adapter=2)])
    first = q.plan()
    assert ids(first) == [0]
    assert [u.adapter_id for u in first.uploads] == [1, 2]  # adapter 2 prefetched
    second = q.plan(prefill_turn=False)
    assert second.uploads == ()
    q.finish(q.running[0])
    third = q.plan()
    assert ids(third) == [1]
    assert third.uploads == ()  # already there: no upload on the critical path


def test_latest_plan_adapters_are_protected_while_sequences_run() -> None:
    q = Queues(planner(num_pages=32, cap=None))
    q.waiting.extend([seq(0, adapter=1), seq(1, adapter=2), seq(2)])
    q.plan()
    q.finish(q.running[1])  # adapter 2 idles; the latest plan used it
    q.waiting.extend([seq(3, adapter=3), seq(4, adapter=4)])
    planned = q.plan()
    # rows for one more rank-8 adapter are free; adapter 4 would need adapter 2's rows, which
    # the latest plan used while sequences still run: not this plan
    assert [u.adapter_id for u in planned.uploads] == [3]
    assert q.p.residency.is_resident(AdapterId(2))
    assert [s.seq_id for s in q.waiting] == [4]
    q.plan(prefill_turn=False)  # decodes 0, 2 and 3: adapter 2 is in no plan from here on
    q.finish(q.running[0])
    q.plan()
    assert not q.p.residency.is_resident(AdapterId(2))
    assert 4 in [s.seq_id for s in q.running]


def test_retired_adapters_free_their_rows_at_the_next_plan() -> None:
    q = Queues(planner())
    q.waiting.append(seq(0, adapter=1))
    q.plan()
    q.finish(q.running[0])
    used = q.p.arena.num_used_rows
    q.p.retire(AdapterId(1))
    assert q.p.arena.num_used_rows == used  # not before the next plan
    q.waiting.append(seq(1))
    q.plan()
    assert q.p.arena.num_used_rows == 0
    assert AdapterId(1) not in q.p.residency.num_evictions


def test_a_starving_request_gets_in_within_the_bounded_wait() -> None:
    q = Queues(planner(cap=1, starve=3))
    q.waiting.append(seq(0, adapter=1, prompt=4))
    q.plan()
    starving = seq(1, adapter=2)
    q.waiting.append(starving)  # needs adapter 1 to drain
    next_id = 2
    for waited in range(20):
        if starving.status is SeqStatus.RUNNING:
            break
        fresh = seq(next_id, adapter=1)  # adapter 1 keeps getting requests
        fresh.waiting_since_step = q.step_no
        q.waiting.append(fresh)
        next_id += 1
        q.plan(prefill_turn=waited % 2 == 0)
        for s in [s for s in q.running if len(s.output_ids) >= 2]:
            q.finish(s)
    assert starving.status is SeqStatus.RUNNING, "adapter 2 starves"
    assert 3 <= waited < 10


def test_effective_capacity_is_the_cap_or_what_rows_hold_at_max_rank() -> None:
    assert effective_capacity(ready(32), None) == 3  # 24 rows above the KV floor, rank 8
    assert effective_capacity(ready(32), 2) == 2
    assert effective_capacity(ready(32), 9) == 3
    no_lora = RunnerReady(**{**_fields(ready(40)), "lora_row_bytes": 0, "lora_max_rows": 0})
    assert effective_capacity(no_lora, None) == 0


def _fields(r: RunnerReady) -> dict[str, object]:
    return {f: getattr(r, f) for f in r.__struct_fields__}


@pytest.mark.parametrize("num_pages", [12, 40])
def test_a_request_that_can_never_fit_is_exhausted_not_stuck(num_pages: int) -> None:
    q = Queues(planner(num_pages=num_pages, budget=200))
    big = seq(0, prompt=4 * 9)  # 10 pages; KV may hold 8 (the rows keep the rest)
    assert pages_needed(len(big.prompt_ids) + 1, PAGE_SIZE) > q.p.arena.num_pages
    q.waiting.append(big)
    planned = q.plan()
    assert planned.decision.exhausted == [big]
    assert not planned.decision.rows


# ----------------------------------------------------------------------------- property


class PlannerMachine(RuleBasedStateMachine):
    """Random requests over adapters of mixed ranks, planned and run step by step, finished,
    aborted and retired. After every operation the arena and residency agree, running adapters
    are resident and no page is held by a request that is not running. At the end, with every
    request gone and every adapter retired, nothing is left allocated."""

    @initialize(
        num_pages=st.integers(12, 60),
        row_bytes=st.sampled_from([50, 100, 150, 250]),
        cap=st.one_of(st.none(), st.integers(1, 4)),
        policy=st.sampled_from(["lru", "fifo"]),
    )
    def setup(self, num_pages: int, row_bytes: int, cap: int | None, policy: str) -> None:
        limits = PlanLimits(
            token_budget=16, max_running=6, page_size=PAGE_SIZE, context_length=32,
            starvation_steps=4,
        )  # fmt: skip
        self.p = Planner(
            ready(num_pages, 100, row_bytes), limits, max_loras_per_batch=cap,
            eviction_policy="fifo" if policy == "fifo" else "lru", prefix_cache=False,
        )  # fmt: skip
        self.q = Queues(self.p)
        self.next_id = 0
        self.known: set[AdapterId] = set()
        self.retired: set[AdapterId] = set()

    @rule(adapter=st.integers(0, 6), prompt=st.integers(1, 12))
    def enqueue(self, adapter: int, prompt: int) -> None:
        a = adapter if adapter and AdapterId(adapter) not in self.retired else None
        s = seq(self.next_id, adapter=a, rank=[1, 2, 4, 8][adapter % 4], prompt=prompt)
        self.next_id += 1
        s.waiting_since_step = self.q.step_no
        self.q.waiting.append(s)
        if a is not None:
            self.known.add(AdapterId(a))

    @rule(prefill=st.booleans())
    def step(self, prefill: bool) -> None:
        planned = self.q.plan(prefill_turn=prefill)
        for s in planned.decision.exhausted:
            (self.q.running if s in self.q.running else self.q.waiting).remove(s)
            self.p.cache.release(s)
        event(f"rows {len(planned.decision.rows)}, uploads {len(planned.uploads)}")
        used = {r.seq.adapter_id for r in planned.decision.rows} - {None}
        assert {a.adapter_id for a in planned.adapters} == used
        in_batch = {s.adapter_id for s in self.q.running} - {None}
        if self.p.cap is not None:
            assert len(in_batch) <= self.p.cap
        assert self.p.draining <= in_batch, "an adapter that left still drains"
        for s in list(self.q.running):  # stop at 20 tokens, as a length limit would
            if s.num_tokens >= 20 and s.num_uncomputed == 1:
                self.q.finish(s)

    @precondition(lambda self: self.q.running or self.q.waiting)
    @rule(index=st.integers(0, 20))
    def abort(self, index: int) -> None:
        queue = self.q.running or list(self.q.waiting)
        s = queue[index % len(queue)]
        if s in self.q.running:
            self.q.finish(s)
        else:
            self.q.waiting.remove(s)

    @rule(adapter=st.integers(1, 6))
    def retire(self, adapter: int) -> None:
        """Unloaded and drained: only when no request holds it."""
        a = AdapterId(adapter)
        holders = [s for s in (*self.q.running, *self.q.waiting) if s.adapter_id == a]
        if a in self.known and not holders and a not in self.retired:
            self.p.retire(a)
            self.retired.add(a)

    @invariant()
    def tables_agree(self) -> None:
        self.p.check_invariants(self.q.running)
        residency, protected = self.p.residency, self.p.latest
        idle = sum(len(v.rows) for v in residency.victims(protected))
        assert residency.obtainable_rows(protected) == self.p.arena.num_free_rows + idle
        held = sum(len(s.blocks) for s in self.q.running)
        assert held == self.p.arena.num_used_pages, "a page is held by no running request"
        assert all(not s.blocks for s in self.q.waiting)

    def teardown(self) -> None:
        if not hasattr(self, "p"):
            return
        for s in list(self.q.running):
            self.q.finish(s)
        self.q.waiting.clear()
        for a in self.known - self.retired:
            self.p.retire(a)
        self.q.plan()  # nothing runs: nothing is protected, every retired adapter goes
        assert self.p.arena.num_used_pages == 0
        assert self.p.arena.num_used_rows == 0
        assert self.p.residency.entries == {}
        self.p.arena.check_invariants()


TestPlannerMachine = PlannerMachine.TestCase
TestPlannerMachine.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip


def test_a_drain_ends_when_its_adapter_is_preempted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the machine: adapter 1 drained, then this plan preempted its only request; the
    drain must end with it (it held no place any more), not linger until a later admission."""
    monkeypatch.setattr(f"{__name__}.event", lambda *_: None)
    m = PlannerMachine()
    m.setup(num_pages=23, row_bytes=250, cap=None, policy="lru")
    m.enqueue(adapter=0, prompt=9)
    m.step(prefill=False)
    m.step(prefill=False)
    for adapter, prompt in ((0, 1), (1, 8), (3, 1)):
        m.enqueue(adapter=adapter, prompt=prompt)
    for _ in range(4):
        m.step(prefill=False)
    assert m.p.draining == {AdapterId(1)}  # it drains for the starving request of adapter 3
    m.step(prefill=False)  # preempts adapter 1's request; asserts the drains are in the batch
    assert AdapterId(1) not in {s.adapter_id for s in m.q.running}
    assert not m.p.draining
