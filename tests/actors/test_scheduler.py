"""SchedulerActor driven through its inbox with a real GpuRunnerActor over FakeRunner and a fake
adapter manager; asserts on the tokens and messages the peers receive."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from lorasrv.config import SchedulerConfig
from lorasrv.engine.gpu_runner import GpuRunnerActor
from lorasrv.engine.scheduler import SchedulerActor
from lorasrv.ids import AdapterId, RequestId, SlotId
from lorasrv.messages import (
    Abort,
    AcquireAdapter,
    AdapterAcquired,
    AdapterAcquireFailed,
    EmitTokens,
    Enqueue,
    LoadSlot,
    PrepareStep,
    ReleaseAdapter,
    RequestFailed,
    SamplingParams,
    SlotAssignment,
    StepAdaptersReady,
)
from tests.fakes import FakeRunner, fake_generate


class Recorder:
    def __init__(self) -> None:
        self.msgs: list[Any] = []

    def send(self, msg: object, /) -> None:
        self.msgs.append(msg)


class FakeAdapters:
    """Answers acquires for names a0..a9 (salt = 100 + n) and places adapters in slots LRU-ish."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.scheduler: SchedulerActor | None = None
        self.runner: GpuRunnerActor | None = None
        self.slots: dict[AdapterId, SlotId] = {}
        self.msgs: list[Any] = []

    def send(self, msg: object, /) -> None:
        self.msgs.append(msg)
        assert self.scheduler is not None
        assert self.runner is not None
        match msg:
            case AcquireAdapter(request_id=rid, lora_name=name):
                if not name.startswith("a"):
                    self.scheduler.send(
                        AdapterAcquireFailed(request_id=rid, code="adapter_not_found", detail=name)
                    )
                else:
                    self.scheduler.send(AdapterAcquired(request_id=rid, adapter_id=int(name[1:])))
            case PrepareStep(step_id=step_id, adapter_ids=ids):
                assert len(ids) <= self.num_slots, "scheduler exceeded the slots"
                keep = {a: s for a, s in self.slots.items() if a in ids}
                free = [SlotId(s) for s in range(self.num_slots) if s not in keep.values()]
                for adapter_id in ids:
                    if adapter_id not in keep:
                        keep[adapter_id] = free.pop()
                        self.runner.send(
                            LoadSlot(slot_id=keep[adapter_id], adapter_id=adapter_id,
                                     weights=100 + adapter_id)
                        )  # fmt: skip
                self.slots = keep
                slots = tuple(SlotAssignment(a, s) for a, s in keep.items())
                self.scheduler.send(StepAdaptersReady(step_id=step_id, slots=slots))


class Harness:
    def __init__(self, *, pages: int = 64, budget: int = 64, slots: int = 2, max_running: int = 8):
        self.fake = FakeRunner(num_kv_pages=pages, page_size=4, num_slots=slots)
        self.tokenizer = Recorder()
        self.adapters = FakeAdapters(slots)
        cfg = SchedulerConfig(chunked_prefill_size=budget, max_running_requests=max_running)
        self.runner = GpuRunnerActor(factory=lambda: self.fake, scheduler=Recorder())
        self.scheduler = SchedulerActor(
            cfg=cfg, ready=self.fake.ready_info, tokenizer=self.tokenizer,
            adapters=self.adapters, runner=self.runner,
        )  # fmt: skip
        self.runner._scheduler = self.scheduler
        self.adapters.scheduler, self.adapters.runner = self.scheduler, self.runner

    async def __aenter__(self) -> Harness:
        await self.runner.start_runner()
        self.tasks = [asyncio.create_task(a.run()) for a in (self.scheduler, self.runner)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.runner.shutdown()

    def enqueue(self, rid: str, prompt: list[int], lora: str | None = None, **params: Any) -> None:
        self.scheduler.send(
            Enqueue(request_id=RequestId(rid), prompt_ids=tuple(prompt), lora_name=lora,
                    params=SamplingParams(**params), arrival_s=0.0)
        )  # fmt: skip

    async def finished(self, rids: set[str]) -> dict[str, list[int]]:
        async with asyncio.timeout(5):
            while not rids <= self.done_ids():
                await asyncio.sleep(0.005)
        return self.outputs()

    def done_ids(self) -> set[str]:
        done = {m.request_id for m in self.tokenizer.msgs if isinstance(m, RequestFailed)}
        done |= {m.request_id for m in self.tokenizer.msgs
                 if isinstance(m, EmitTokens) and m.finish_reason}  # fmt: skip
        return done

    def outputs(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for m in self.tokenizer.msgs:
            if isinstance(m, EmitTokens):
                out.setdefault(m.request_id, []).extend(m.token_ids)
        return out

    def finish(self, rid: str) -> EmitTokens | RequestFailed:
        return next(
            m for m in self.tokenizer.msgs
            if m.request_id == rid and (isinstance(m, RequestFailed) or m.finish_reason)
        )  # fmt: skip


PROMPTS = [[5 + i for i in range(n)] for n in (3, 9, 17, 30)]


async def test_base_rows_match_the_fake_model() -> None:
    async with Harness() as h:
        for i, prompt in enumerate(PROMPTS):
            h.enqueue(f"r{i}", prompt, max_new_tokens=12, ignore_eos=True)
        out = await h.finished({f"r{i}" for i in range(len(PROMPTS))})
        for i, prompt in enumerate(PROMPTS):
            assert out[f"r{i}"] == fake_generate(prompt, 0, 12)
            finish = h.finish(f"r{i}")
            assert isinstance(finish, EmitTokens)
            assert finish.finish_reason == "length"
        assert h.scheduler._pool.num_used == 0


@pytest.mark.parametrize(("pages", "budget"), [(64, 8), (9, 64), (7, 5)])
async def test_chunking_and_preemption_keep_outputs_exact(pages: int, budget: int) -> None:
    async with Harness(pages=pages, budget=budget) as h:
        for i, prompt in enumerate(PROMPTS[:3]):
            h.enqueue(f"r{i}", prompt, max_new_tokens=10)
        out = await h.finished({"r0", "r1", "r2"})
        for i, prompt in enumerate(PROMPTS[:3]):
            assert out[f"r{i}"] == fake_generate(prompt, 0, 10)
        assert h.scheduler._pool.num_used == 0
        async with asyncio.timeout(5):  # runner-side sampler state dropped too (next plan)
            while h.fake.live_seqs:
                await asyncio.sleep(0.002)


async def test_adapters_more_than_slots_all_finish_with_their_own_delta() -> None:
    async with Harness(slots=2) as h:
        names = ["a1", "a2", "a3", None, "a1", "a4"]
        for i, name in enumerate(names):
            h.enqueue(f"r{i}", PROMPTS[i % 4], lora=name, max_new_tokens=6)
        out = await h.finished({f"r{i}" for i in range(len(names))})
        for i, name in enumerate(names):
            salt = 0 if name is None else 100 + int(name[1:])
            assert out[f"r{i}"] == fake_generate(PROMPTS[i % 4], salt, 6), name
        releases = Counter(m.request_id for m in h.adapters.msgs if isinstance(m, ReleaseAdapter))
        acquired = {f"r{i}" for i, n in enumerate(names) if n}
        assert releases == Counter(acquired)  # exactly once each


async def test_abort_frees_pages_and_releases_once() -> None:
    async with Harness() as h:
        h.enqueue("long", PROMPTS[3], lora="a1", max_new_tokens=200, ignore_eos=True)
        async with asyncio.timeout(5):
            while len(h.outputs().get("long", [])) < 3:
                await asyncio.sleep(0.002)
        h.scheduler.send(Abort(request_id=RequestId("long")))
        await h.finished({"long"})
        finish = h.finish("long")
        assert isinstance(finish, EmitTokens)
        assert finish.finish_reason == "abort"
        assert h.scheduler._pool.num_used == 0
        releases = [m for m in h.adapters.msgs if isinstance(m, ReleaseAdapter)]
        assert [m.request_id for m in releases] == ["long"]
        h.scheduler.send(Abort(request_id=RequestId("long")))  # twice: ignored
        h.enqueue("after", PROMPTS[0], max_new_tokens=1)  # FIFO inbox: the abort came first
        await h.finished({"after"})
        assert len([m for m in h.adapters.msgs if isinstance(m, ReleaseAdapter)]) == 1


async def test_unknown_adapter_fails_the_request() -> None:
    async with Harness() as h:
        h.enqueue("bad", [1, 2, 3], lora="nope")
        await h.finished({"bad"})
        finish = h.finish("bad")
        assert isinstance(finish, RequestFailed)
        assert finish.code == "adapter_not_found"


async def test_stop_token_ids_and_prompt_too_long() -> None:
    expected = fake_generate(PROMPTS[1], 0, 8)
    async with Harness() as h:
        h.enqueue("stop", PROMPTS[1], max_new_tokens=8, stop_token_ids=[expected[3]])
        h.enqueue("huge", list(range(1, 100)) * 3)
        await h.finished({"stop", "huge"})
        stop = h.finish("stop")
        assert isinstance(stop, EmitTokens)
        assert stop.finish_reason == "stop"
        assert stop.matched_stop == expected[3]
        assert h.outputs()["stop"] == expected[: expected.index(expected[3]) + 1]
        huge = h.finish("huge")
        assert isinstance(huge, RequestFailed)
        assert huge.code == "prompt_too_long"


async def test_plans_say_whether_the_next_step_should_decode_the_same_rows() -> None:
    # While a request waits or is mid-prefill the next step is likely a prefill step, so the
    # runner must not launch a decode step ahead (it would be dropped); otherwise it may.
    async with Harness(budget=8) as h:
        h.enqueue("a", PROMPTS[0], max_new_tokens=6, temperature=0.0)
        await h.finished({"a"})
        h.enqueue("b", PROMPTS[0], max_new_tokens=6, temperature=0.0)
        h.enqueue("c", PROMPTS[3], max_new_tokens=3, temperature=0.0)  # 30 tokens: 4 chunks
        await h.finished({"b", "c"})
    plans = [p for p in h.fake.plans if p.seq_ids]
    decode_only = [p for p in plans if all(q == 1 for q in p.query_lens)]
    assert any(p.expect_next_decode for p in decode_only)  # "a" alone, and b+c at the end
    # "b" decodes while "c" is still in prefill: those decode plans expect a prefill next
    assert any(not p.expect_next_decode for p in decode_only)
    for p in decode_only:  # the flag matters after decode steps only: there the runner guesses
        if not p.expect_next_decode:
            later = plans[plans.index(p) + 1 :]
            assert later, "a plan expecting prefill work was the last one"
            assert any(q > 1 for q in later[0].query_lens) or len(later[0].seq_ids) != len(
                p.seq_ids
            )


async def test_plans_mark_rows_whose_next_token_is_their_last() -> None:
    async with Harness() as h:
        h.enqueue("a", PROMPTS[0], max_new_tokens=3, temperature=0.0)
        h.enqueue("b", PROMPTS[1], max_new_tokens=5, temperature=0.0)
        await h.finished({"a", "b"})
    plans = [p for p in h.fake.plans if p.seq_ids]
    marked = {}
    for p in plans:
        for seq_id, last in zip(p.seq_ids, p.last_rows, strict=True):
            if last:
                marked[seq_id] = marked.get(seq_id, 0) + 1
    assert marked == {0: 1, 1: 1}  # once each: in the step that yields the last token
    last_plan_of = {seq_id: max(i for i, p in enumerate(plans) if seq_id in p.seq_ids)
                    for seq_id in (0, 1)}  # fmt: skip
    for seq_id, i in last_plan_of.items():
        assert plans[i].last_rows[plans[i].seq_ids.index(seq_id)]
