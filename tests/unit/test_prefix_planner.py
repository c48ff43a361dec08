"""The planner with the prefix cache on: requests start on their cached prefix and prefill only
the rest; prompts that share pages (a system prompt, identical prompts) wait for the first one's
pages; KV demand evicts unused cached pages
before idle adapters or running requests; adapter demand takes rows over unused cached pages
before idle adapters; preempted requests come back on what is left of their pages; an unloaded
adapter's pages and a flush go at once."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from lorasrv.engine.planner import Planned, Planner
from lorasrv.engine.policy import PlanLimits
from lorasrv.engine.prefix_pages import written_by
from lorasrv.engine.sequence import SeqStatus, Sequence
from lorasrv.ids import AdapterId, RequestId, SeqId
from lorasrv.messages import RunnerReady, SamplingParams
from tests.unit.planner_fixtures import PAGE_SIZE, Queues, ready


def seq(i: int, tokens: Seq[int], adapter: int | None = None, rank: int = 8) -> Sequence:
    s = Sequence(SeqId(i), RequestId(f"r{i}"), tuple(tokens), SamplingParams())
    s.adapter_id = None if adapter is None else AdapterId(adapter)
    s.adapter_rank = rank if adapter is not None else 0
    s.status = SeqStatus.WAITING
    return s


def prompt(start: int, num: int) -> tuple[int, ...]:
    return tuple(range(start, start + num))


class Sim(Queues):
    """The scheduler's part around the planner with one step in flight: commit each row's
    tokens, settle the step (its full pages join the cache), append a sampled token, release at
    the end; tables checked after every plan."""

    def settle(self, planned: Planned) -> None:
        self.p.cache.settle(written_by(row.seq for row in planned.decision.rows))

    def finish_all(self) -> None:
        for s in list(self.running):
            self.finish(s)


def planner(
    num_pages: int = 100, *, cap: int | None = None, budget: int = 64, lora: bool = True
) -> Planner:
    limits = PlanLimits(token_budget=budget, max_running=16, page_size=PAGE_SIZE,
                        context_length=32)  # fmt: skip
    info = ready(num_pages)
    if not lora:
        fields = {f: getattr(info, f) for f in info.__struct_fields__}
        info = RunnerReady(**{**fields, "lora_row_bytes": 0, "lora_max_rows": 0})
    return Planner(info, limits, max_loras_per_batch=cap, eviction_policy="lru")


def rows(planned: Planned) -> dict[int, int]:
    """seq id -> tokens it computes in the step."""
    return {r.seq.seq_id: r.num_new for r in planned.decision.rows}


def test_a_cached_prefix_is_in_place_and_only_the_rest_is_prefilled() -> None:
    q = Sim(planner())
    first = seq(0, prompt(1, 14))
    q.waiting.append(first)
    q.plan()
    pages = first.blocks[:3]
    q.finish(first)
    same, other, base_again, short = (
        seq(1, prompt(1, 14)), seq(2, prompt(1, 14), adapter=1), seq(3, (*prompt(1, 14), 99)),
        seq(4, prompt(1, 12)),
    )  # fmt: skip
    q.waiting.extend([same, other, base_again, short])
    planned = q.plan()
    # 3 full pages (12 tokens) cached; another adapter finds none of them; a prompt of exactly
    # 3 pages recomputes its last page (its last token needs logits)
    assert rows(planned) == {1: 2, 2: 14, 3: 3, 4: 4}
    assert same.blocks[:3] == pages
    assert (same.cached_tokens, other.cached_tokens, base_again.cached_tokens) == (12, 0, 12)
    assert short.cached_tokens == 8
    assert not set(pages) & set(other.blocks)


def test_identical_prompts_wait_for_the_first_ones_pages() -> None:
    q = Sim(planner(budget=8))
    samples = [seq(i, prompt(1, 17)) for i in range(3)]  # 4 full pages, then the last token
    q.waiting.extend(samples)
    assert rows(q.plan()) == {0: 8}  # the others wait rather than computing the same pages
    assert rows(q.plan()) == {0: 8}
    # its last prompt token is a decode step's; the others start on its 4 pages
    assert rows(q.plan()) == {1: 1, 2: 1}
    assert rows(q.plan(prefill_turn=False)) == {0: 1, 1: 1, 2: 1}
    assert samples[1].blocks[:4] == samples[2].blocks[:4] == samples[0].blocks[:4]
    assert [s.cached_tokens for s in samples] == [0, 16, 16]


SYSTEM = prompt(1000, 36)  # 9 full pages: more than MIN_SHARED_TOKENS (32, 8 pages of 4)


def long_planner(budget: int) -> Planner:
    limits = PlanLimits(token_budget=budget, max_running=16, page_size=PAGE_SIZE,
                        context_length=64)  # fmt: skip
    return Planner(ready(100), limits, max_loras_per_batch=None, eviction_policy="lru")


def test_prompts_sharing_a_system_prompt_wait_for_its_pages_then_prefill_the_rest() -> None:
    q = Sim(long_planner(budget=100))
    first, second = seq(0, (*SYSTEM, 7, 8, 9)), seq(1, (*SYSTEM, 20, 21))
    few = seq(2, (*SYSTEM[:12], *prompt(300, 5)))  # shares 3 pages: not enough to wait
    other_adapter = seq(3, (*SYSTEM, 20, 21), adapter=1)  # another version's KV: never waits
    q.waiting.extend([first, second, few, other_adapter])
    assert rows(q.plan()) == {0: 39, 2: 17, 3: 38}  # the second waits for the first's pages
    assert rows(q.plan())[1] == 2  # then starts on its 9 cached pages
    assert (second.cached_tokens, few.cached_tokens, other_adapter.cached_tokens) == (36, 0, 0)
    assert second.blocks[:9] == first.blocks[:9]


def test_a_waiting_prompt_goes_on_when_the_one_it_waits_for_leaves() -> None:
    q = Sim(long_planner(budget=16))
    first, second = seq(0, (*SYSTEM, 7, 8, 9)), seq(1, (*SYSTEM, 20, 21))
    q.waiting.extend([first, second])
    assert rows(q.plan()) == {0: 16}
    assert rows(q.plan()) == {0: 16}  # 8 of the 9 shared pages cached after this step
    q.finish(first)  # aborted mid-prefill: nothing left to wait for
    assert rows(q.plan()) == {1: 6}
    assert second.cached_tokens == 32  # the pages the first one got to cache


def test_kv_demand_evicts_unused_cached_pages_before_adapters_and_running_requests() -> None:
    # 40 pages; cap 1 keeps 8 rows (pages 32-39) for adapters, the KV floor 8 pages
    q = Sim(planner(num_pages=40, cap=1, budget=200))
    q.waiting.extend([seq(0, prompt(1, 28)), seq(1, prompt(100, 28))])  # 7 full pages each
    q.plan()
    q.finish_all()
    assert q.p.cache.num_pages == 14
    for adapter in (1, 2):  # idle adapters over pages 24-39
        assert q.p.residency.place(AdapterId(adapter), 8, pinned=False, protected=())
    assert q.p.arena.num_free_pages == 10
    q.waiting.extend([seq(2, prompt(200, 28)), seq(3, prompt(300, 28))])
    planned = q.plan()
    assert rows(planned) == {2: 28, 3: 28}
    assert not planned.decision.preempted
    assert not q.p.residency.num_evictions  # the cache gave its pages first
    assert q.p.cache.num_pages == 14 - 4 + 14  # 4 unused cached pages went; 14 new ones


def test_adapter_demand_takes_rows_over_unused_cached_pages_before_idle_adapters() -> None:
    # 40 pages, rows of one page: cap 1 keeps rows 32-39 for adapters; KV may use pages 0-31
    q = Sim(planner(num_pages=40, cap=1, budget=200))
    q.waiting.extend([seq(i, prompt(100 * i, 28)) for i in range(4)])  # 7 full pages each
    q.plan()
    q.finish_all()  # pages 0-27 cached, nobody holds them
    assert q.p.arena.num_reclaimable_rows == 28 - 8  # rows 8-27 (rows below 8: the KV floor)
    q.waiting.append(seq(4, prompt(1, 3), adapter=1))
    q.plan()
    q.finish_all()  # adapter 1 (rows 32-39) idles
    q.waiting.append(seq(5, prompt(1, 3), adapter=2))
    planned = q.plan()
    assert rows(planned) == {5: 3}
    # free rows 28-31, then rows 24-27 over cached pages; adapter 1 keeps its rows
    assert sorted(planned.uploads[0].rows) == [24, 25, 26, 27, 28, 29, 30, 31]
    assert q.p.residency.is_resident(AdapterId(1))
    # pages 24-27 went for the rows; then seq 5's one page took the least recently used one
    assert q.p.cache.num_pages == 28 - 4 - 1


def test_an_adapter_is_admitted_on_rows_over_unused_cached_pages_alone() -> None:
    # cap 2 keeps rows 24-39 for adapters; the cache holds pages 0-23, nobody uses them
    q = Sim(planner(num_pages=40, cap=2, budget=200))
    q.waiting.extend([*(seq(i, prompt(100 * i, 28)) for i in range(3)), seq(3, prompt(1, 12))])
    q.plan()
    q.finish_all()
    assert q.p.residency.place(AdapterId(3), 8, pinned=True, protected=())  # rows 32-39
    q.waiting.append(seq(4, prompt(1, 3), adapter=1))  # rows 24-31, and it keeps running
    q.plan()
    assert q.p.arena.num_free_rows == 0
    q.waiting.append(seq(5, prompt(1, 3), adapter=2))
    planned = q.plan()
    # no free rows, no idle adapter (1 runs, 3 is pinned): rows over cached pages only
    assert rows(planned) == {5: 3}
    assert sorted(planned.uploads[0].rows) == list(range(16, 24))
    assert not q.p.residency.num_evictions


def test_a_preempted_request_comes_back_on_what_is_left_of_its_pages() -> None:
    q = Sim(planner(num_pages=8, lora=False, budget=200))
    first, second = seq(0, prompt(1, 12)), seq(1, prompt(100, 12))
    q.waiting.extend([first, second])
    q.plan()
    preempted: list[Sequence] = []
    while not preempted:  # both decode until 8 pages are not enough for two
        preempted = q.plan(prefill_turn=False).decision.preempted
    assert preempted == [second]
    assert second.cached_tokens == 0
    cached_before = q.p.cache.num_pages
    q.finish(first)
    planned = q.plan()
    hit = second.num_tokens - rows(planned)[1]
    assert hit >= 12, "its prompt's pages were still cached"
    assert second.cached_tokens == 0  # reported for its first admission only
    assert q.p.cache.num_pages >= cached_before - 1


def test_an_unloaded_adapter_s_pages_go_at_once_and_a_flush_drops_every_unused_page() -> None:
    q = Sim(planner())
    held = seq(0, prompt(1, 13))
    q.waiting.extend([seq(1, prompt(1, 13), adapter=1), held])
    q.plan()
    q.finish(q.running[0])  # adapter 1's request ends; the base request runs on
    assert q.p.cache.num_pages == 6
    q.p.retire(AdapterId(1))
    assert q.p.cache.num_pages == 3
    assert q.p.cache.flush() == 0  # held by the running request
    q.finish(held)
    assert q.p.cache.flush() == 3
    assert q.p.arena.num_used_pages == 0


def test_a_step_planned_before_a_preemption_publishes_nothing_when_it_lands() -> None:
    q = Sim(planner(budget=8))
    s = seq(0, prompt(1, 14))
    q.waiting.append(s)
    planned = q.p.plan(q.running, q.waiting, 1, prefill_turn=True)
    assert rows(planned) == {0: 8}
    s.num_computed += 8  # the step is sent: two full pages are being written
    in_flight = written_by([s])
    q.running.remove(s)  # preempted before the step lands: its pages go back to the arena
    q.p.cache.release(s)
    s.status = SeqStatus.WAITING
    q.waiting.append(s)
    q.p.plan(q.running, q.waiting, 2, prefill_turn=True)  # admitted again, on new pages
    assert s.num_computed == 0
    q.p.cache.settle(in_flight)  # the old step lands: its rows belong to another admission
    assert q.p.cache.num_pages == 0
    q.p.check_invariants(q.running)
    s.num_computed += 8
    q.p.cache.settle(written_by([s]))  # the new admission's step lands: now they are cached
    assert q.p.cache.num_pages == 2
    q.p.check_invariants(q.running)
