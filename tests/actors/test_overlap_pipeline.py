"""The overlap schedule in the scheduler, through its inbox with a real GpuRunnerActor over
FakeRunner: step N+1 is planned before step N's tokens are back (its continuing rows read them
on the "device"), results are applied one step late, and a row that finished is dropped from
the steps after. Waits are on observable state (the runner's inbox, finished requests)."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import pytest

from lorasrv.config import AdapterConfig, SchedulerConfig
from lorasrv.engine.scheduler import SchedulerActor
from lorasrv.ids import RequestId
from lorasrv.messages import (
    Abort,
    EmitTokens,
    Enqueue,
    ReleaseAdapter,
    RunStep,
    SamplingParams,
    StepDone,
    StepPlan,
)
from tests.actors.test_scheduler import PROMPTS, Harness, Recorder, StatsRecorder
from tests.fakes import FakeRunner, fake_generate


class Pump:
    """The scheduler alone, its steps run by hand in the order sent, one at a time: step N's
    StepDone is handed back while the steps sent after it are still unrun, exactly the
    overlapped timeline, without threads or timing."""

    def __init__(self, *, overlap: bool = True, pages: int = 128, budget: int = 64) -> None:
        self.fake = FakeRunner(num_kv_pages=pages, page_size=4, lora_rows=0)
        self.sent, self.tokenizer, self.stats = Recorder(), Recorder(), StatsRecorder()
        cfg = SchedulerConfig(chunked_prefill_size=budget, disable_overlap_schedule=not overlap)
        self.scheduler = SchedulerActor(
            cfg=cfg, adapter_cfg=AdapterConfig(), ready=self.fake.ready_info,
            tokenizer=self.tokenizer, adapters=Recorder(), runner=self.sent, stats=self.stats,
        )  # fmt: skip
        self.num_run = 0
        self.max_unrun = 0  # the most steps with rows sent and not yet answered

    def num_pages_left(self) -> int:
        """KV pages still allocated once the prefix cache dropped what nobody holds."""
        planner = self.scheduler.planner
        planner.cache.flush()
        return planner.arena.num_used_pages

    def enqueue(self, rid: str, prompt: list[int], **params: object) -> None:
        self.scheduler.handle(Enqueue(request_id=RequestId(rid), prompt_ids=tuple(prompt),
                                      lora_name=None, params=SamplingParams(**params)))  # fmt: skip
        self.scheduler.after_batch()

    def run(self) -> dict[str, list[int]]:
        """Every step to the end; each request's tokens."""
        while self.num_run < len(self.sent.msgs):
            self.run_one()
        out: dict[str, list[int]] = {}
        for m in self.tokenizer.msgs:
            if isinstance(m, EmitTokens):
                out.setdefault(m.request_id, []).extend(m.token_ids)
        return out

    def run_one(self) -> None:
        """Run the oldest unrun step and hand its StepDone back."""
        plan = self.sent.msgs[self.num_run].plan
        self.num_run += 1
        unrun = [m for m in self.sent.msgs[self.num_run - 1 :] if m.plan.seq_ids]
        self.max_unrun = max(self.max_unrun, len(unrun))
        result = self.fake.step(plan)
        if plan.seq_ids:
            sampled = tuple(itertools.compress(plan.seq_ids, plan.sample_rows))
            self.scheduler.handle(StepDone(step_id=plan.step_id, seq_ids=sampled,
                                           result=result))  # fmt: skip
            self.scheduler.after_batch()

    def finish(self, rid: str) -> EmitTokens:
        return next(m for m in self.tokenizer.msgs if m.request_id == rid and m.finish_reason)


def sampled_rows(plans: list[StepPlan]) -> Counter[int]:
    """How many tokens each sequence was sampled, over every plan the runner got."""
    return Counter(seq_id for p in plans for seq_id in itertools.compress(p.seq_ids, p.sample_rows))


async def test_the_first_decode_is_planned_while_the_prefill_runs() -> None:
    async with Harness() as h:
        h.fake.gate.clear()  # the prefill step stays on the runner thread
        h.enqueue("a", PROMPTS[1], max_new_tokens=5, ignore_eos=True)
        async with asyncio.timeout(5):
            while len(h.sent.msgs) < 2:
                await asyncio.sleep(0.002)
        assert h.fake.num_steps_started == 1  # the prefill has not answered yet
        prefill, decode = (m.plan for m in h.sent.msgs if isinstance(m, RunStep))
        assert prefill.query_lens == (len(PROMPTS[1]),)
        assert decode.query_lens == (1,)
        assert decode.device_inputs == (True,)  # the prefill's token, not on the host yet
        assert decode.input_ids == (0,)
        assert decode.context_lens == (len(PROMPTS[1]),)
        h.fake.gate.set()
        out = await h.finished({"a"})
    assert out["a"] == fake_generate(PROMPTS[1], 0, 5)
    assert h.stats.last.num_steps_overlapped >= 1


def test_rows_stopping_by_length_never_run_past_their_last_token() -> None:
    limits = [1, 2, 5, 9]
    pump = Pump()
    for i, n in enumerate(limits):
        pump.enqueue(f"r{i}", PROMPTS[i], max_new_tokens=n, ignore_eos=True)
    out = pump.run()
    for i, n in enumerate(limits):
        assert out[f"r{i}"] == fake_generate(PROMPTS[i], 0, n)
    assert pump.num_pages_left() == 0
    # each sampled exactly as often as it had tokens to give: known in advance, so no step was
    # planned for a row whose last token was already on its way
    assert sampled_rows(pump.fake.plans) == dict(enumerate(limits))
    assert pump.stats.last.num_tokens_dropped == 0
    assert pump.max_unrun == 2
    assert pump.stats.last.num_steps_overlapped == pump.stats.last.num_steps - 1


@pytest.mark.parametrize("overlap", [True, False])
def test_a_stop_token_ends_the_row_one_step_late(overlap: bool) -> None:
    expected = fake_generate(PROMPTS[1], 0, 8)
    pump = Pump(overlap=overlap)
    pump.enqueue("stop", PROMPTS[1], max_new_tokens=8, stop_token_ids=[expected[3]])
    pump.enqueue("other", PROMPTS[2], max_new_tokens=8, ignore_eos=True)
    out = pump.run()
    assert out["stop"] == expected[:4]
    assert out["other"] == fake_generate(PROMPTS[2], 0, 8)
    finish = pump.finish("stop")
    assert (finish.finish_reason, finish.matched_stop) == ("stop", expected[3])
    assert pump.num_pages_left() == 0
    assert not pump.fake.live_seqs  # runner state dropped, in the plan after
    # overlapped: the step after the stop was planned before it was seen; its token is dropped
    extra = 1 if overlap else 0
    assert sampled_rows(pump.fake.plans)[0] == 4 + extra
    assert pump.stats.last.num_tokens_dropped == extra
    assert any(p.device_inputs for p in pump.fake.plans) == overlap
    assert pump.max_unrun == (2 if overlap else 1)


async def test_an_abort_with_steps_in_flight_frees_at_once_and_drops_their_tokens() -> None:
    async with Harness() as h:
        h.enqueue("long", PROMPTS[0], lora="a1", max_new_tokens=200, ignore_eos=True)
        async with asyncio.timeout(5):
            while len(h.outputs().get("long", [])) < 3:
                await asyncio.sleep(0.002)
        h.fake.gate.clear()
        started = h.fake.num_steps_started
        async with asyncio.timeout(5):  # a step started since waits on the runner thread
            while h.fake.num_steps_started == started or len(h.scheduler._in_flight) < 2:
                await asyncio.sleep(0.002)
        h.scheduler.send(Abort(request_id=RequestId("long")))
        await h.finished({"long"})
        assert h.num_pages_used == 0  # freed while its steps are still queued
        releases = [m.request_id for m in h.adapters.msgs if isinstance(m, ReleaseAdapter)]
        assert releases == ["long"]
        h.fake.gate.set()
        h.enqueue("after", PROMPTS[1], max_new_tokens=3, ignore_eos=True)
        out = await h.finished({"after"})
        assert out["after"] == fake_generate(PROMPTS[1], 0, 3)
        assert h.stats.last.num_tokens_dropped >= 1


@pytest.mark.parametrize(("pages", "budget"), [(9, 64), (7, 5)])
def test_preempted_with_a_token_in_flight_it_waits_for_it_then_recomputes(
    pages: int, budget: int
) -> None:
    # a few pages of 4 tokens for three growing requests: preemptions while steps are in flight
    pump = Pump(pages=pages, budget=budget)
    for i, prompt in enumerate(PROMPTS[:3]):
        pump.enqueue(f"r{i}", prompt, max_new_tokens=10)
    out = pump.run()
    for i, prompt in enumerate(PROMPTS[:3]):
        assert out[f"r{i}"] == fake_generate(prompt, 0, 10)
    assert pump.num_pages_left() == 0
    plans = pump.fake.plans
    caught_in_flight = 0
    for j, plan in enumerate(plans):
        for new in plan.new_seqs:
            earlier = [p for p in plans[:j] if new.seq_id in p.seq_ids]
            if not earlier:
                continue  # its first admission
            # re-added after a preemption: with every token it was sampled before, those that
            # were still in flight when it was preempted included
            sampled = sum(new.seq_id in itertools.compress(p.seq_ids, p.sample_rows)
                          for p in earlier)  # fmt: skip
            assert len(new.output_ids) == sampled
            freed_at = max(i for i, p in enumerate(plans[: j + 1]) if new.seq_id in p.freed_seq_ids)
            before = plans[freed_at - 1]
            caught_in_flight += new.seq_id in itertools.compress(before.seq_ids, before.sample_rows)
    assert caught_in_flight, "no preemption caught a token in flight"


def test_cached_pages_are_published_only_when_the_step_that_wrote_them_answers() -> None:
    pump = Pump(budget=8)
    prompt = list(range(5, 22))  # 17 tokens: chunks of 8, 8 and 1; 4 full pages
    pump.enqueue("a", prompt, max_new_tokens=4, ignore_eos=True)
    cache = pump.scheduler.planner.cache
    assert [len(m.plan.seq_ids) for m in pump.sent.msgs] == [1, 1]  # two chunks in flight
    assert cache.num_pages == 0, "pages of steps in flight were published"
    pump.run_one()
    assert cache.num_pages == 2  # the first chunk's pages, once its step answered
    pump.run_one()
    assert cache.num_pages == 4
    out = pump.run()
    assert out["a"] == fake_generate(prompt, 0, 4)
    pump.enqueue("b", prompt, max_new_tokens=4, ignore_eos=True)  # finds the 4 pages
    assert pump.run()["b"] == fake_generate(prompt, 0, 4)
    assert pump.finish("b").cached_tokens == 16
    assert pump.num_pages_left() == 0
