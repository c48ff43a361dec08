"""SchedulerActor driven through its inbox with a real GpuRunnerActor over FakeRunner and a fake
adapter manager; asserts on the tokens and messages the peers receive."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from lorasrv.config import AdapterConfig, SchedulerConfig
from lorasrv.engine.gpu_runner import GpuRunnerActor
from lorasrv.engine.scheduler import SchedulerActor
from lorasrv.engine.stats import SchedulerStats
from lorasrv.ids import AdapterId, RequestId
from lorasrv.messages import (
    Abort,
    AcquireAdapter,
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterRetired,
    CacheFlushed,
    EmitTokens,
    Enqueue,
    HostCopyReady,
    ReleaseAdapter,
    RequestFailed,
    SamplingParams,
)
from tests.fakes import FakeRunner, fake_generate


class Recorder:
    def __init__(self) -> None:
        self.msgs: list[Any] = []

    def send(self, msg: object, /) -> None:
        self.msgs.append(msg)


RANKS = {1: 2, 2: 4, 3: 3, 4: 4, 5: 1, 6: 2, 7: 3, 8: 4, 9: 2}


class FakeAdapters:
    """Answers acquires for names a1..a9 (salt = 100 + n, rank RANKS[n]) as the adapter manager
    does: the host copy goes to the runner before the grant."""

    def __init__(self) -> None:
        self.scheduler: SchedulerActor | None = None
        self.runner: GpuRunnerActor | None = None
        self.msgs: list[Any] = []
        self.sent_copies: set[int] = set()

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
                    return
                n = int(name[1:])
                if n not in self.sent_copies:
                    self.sent_copies.add(n)
                    self.runner.send(HostCopyReady(adapter_id=AdapterId(n), weights=100 + n,
                                                   rank=RANKS[n], scaling=1.0))  # fmt: skip
                self.scheduler.send(
                    AdapterAcquired(request_id=rid, adapter_id=AdapterId(n), rank=RANKS[n])
                )


class Tee(Recorder):
    """Records what it forwards (the plans the scheduler sends, before the runner runs them)."""

    def __init__(self, to: GpuRunnerActor) -> None:
        super().__init__()
        self.to = to

    def send(self, msg: object, /) -> None:
        super().send(msg)
        self.to.send(msg)  # type: ignore[arg-type]


class StatsRecorder:
    def __init__(self) -> None:
        self.last = SchedulerStats()

    def scheduler_stats(self, stats: SchedulerStats) -> None:
        self.last = stats


class Harness:
    def __init__(
        self, *, pages: int = 128, budget: int = 64, cap: int | None = 2, max_running: int = 8,
        lora_rows: int | None = None, overlap: bool = True, radix_cache: bool = True,
    ) -> None:  # fmt: skip
        self.fake = FakeRunner(num_kv_pages=pages, page_size=4, max_lora_rank=4,
                               lora_rows=lora_rows)  # fmt: skip
        self.tokenizer = Recorder()
        self.adapters = FakeAdapters()
        self.stats = StatsRecorder()
        cfg = SchedulerConfig(chunked_prefill_size=budget, max_running_requests=max_running,
                              disable_overlap_schedule=not overlap,
                              disable_radix_cache=not radix_cache)  # fmt: skip
        self.flushed: list[CacheFlushed] = []  # the engine's side of FlushCache
        self.runner = GpuRunnerActor(factory=lambda: self.fake, scheduler=Recorder())
        self.sent = Tee(self.runner)
        self.scheduler = SchedulerActor(
            cfg=cfg, adapter_cfg=AdapterConfig(max_loras_per_batch=cap),
            ready=self.fake.ready_info, tokenizer=self.tokenizer, adapters=self.adapters,
            runner=self.sent, stats=self.stats, ops=self,
        )  # fmt: skip
        self.runner._scheduler = self.scheduler
        self.adapters.scheduler, self.adapters.runner = self.scheduler, self.runner

    def cache_flushed(self, result: CacheFlushed) -> None:
        self.flushed.append(result)

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
                    params=SamplingParams(**params))
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

    @property
    def num_pages_used(self) -> int:
        """Pages held by requests (cached pages nobody holds are free memory)."""
        arena = self.scheduler.planner.arena
        return arena.num_used_pages - arena.num_evictable_pages


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
        assert h.num_pages_used == 0


@pytest.mark.parametrize(("pages", "budget"), [(64, 8), (9, 64), (7, 5)])
async def test_chunking_and_preemption_keep_outputs_exact(pages: int, budget: int) -> None:
    # base requests only: no LoRA rows, so the few pages are all KV's
    async with Harness(pages=pages, budget=budget, lora_rows=0) as h:
        for i, prompt in enumerate(PROMPTS[:3]):
            h.enqueue(f"r{i}", prompt, max_new_tokens=10)
        out = await h.finished({"r0", "r1", "r2"})
        for i, prompt in enumerate(PROMPTS[:3]):
            assert out[f"r{i}"] == fake_generate(prompt, 0, 10)
        assert h.num_pages_used == 0
        async with asyncio.timeout(5):  # runner-side sampler state dropped too (next plan)
            while h.fake.live_seqs:
                await asyncio.sleep(0.002)


async def test_adapters_more_than_fit_all_finish_with_their_own_delta() -> None:
    # 10 rows: a1 (rank 2), a2 (4), a3 (3) and a4 (4) cannot all be resident, so adapters are
    # evicted and uploaded again between batches; and at most 2 run at once
    async with Harness(cap=2, lora_rows=10) as h:
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
        assert h.scheduler.planner.residency.num_evictions  # the rows were too few for all
        for plan in h.fake.plans:
            assert len(plan.adapters) <= 2


async def test_abort_frees_pages_and_releases_once() -> None:
    async with Harness() as h:
        h.fake.step_delay_s = 0.002
        h.enqueue("long", PROMPTS[0], lora="a1", max_new_tokens=200, ignore_eos=True)
        async with asyncio.timeout(5):
            while len(h.outputs().get("long", [])) < 3:
                await asyncio.sleep(0.002)
        h.scheduler.send(Abort(request_id=RequestId("long")))
        await h.finished({"long"})
        finish = h.finish("long")
        assert isinstance(finish, EmitTokens)
        assert finish.finish_reason == "abort"
        assert h.num_pages_used == 0
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


async def test_an_adapter_is_uploaded_once_while_resident_and_retired_rows_are_freed() -> None:
    async with Harness() as h:
        for i in range(3):
            h.enqueue(f"r{i}", PROMPTS[i], lora="a2", max_new_tokens=4)
            await h.finished({f"r{i}"})
        uploads = [u for p in h.fake.plans for u in p.uploads]
        assert [u.adapter_id for u in uploads] == [2]  # once, then resident
        assert h.scheduler.planner.arena.num_used_rows == RANKS[2]
        h.scheduler.send(AdapterRetired(adapter_id=AdapterId(2)))  # unloaded for good
        h.enqueue("base", PROMPTS[0], max_new_tokens=2)
        await h.finished({"base"})
        assert h.scheduler.planner.arena.num_used_rows == 0
        assert h.num_pages_used == 0


async def test_a_queued_requests_adapter_is_prefetched_while_others_decode() -> None:
    async with Harness(cap=1) as h:
        h.fake.step_delay_s = 0.002
        h.enqueue("first", PROMPTS[0], lora="a1", max_new_tokens=12, ignore_eos=True)
        h.enqueue("queued", PROMPTS[1], lora="a3", max_new_tokens=3)  # cap 1: waits for a1
        out = await h.finished({"first", "queued"})
        assert out["queued"] == fake_generate(PROMPTS[1], 103, 3)
    plans = [p for p in h.fake.plans if p.seq_ids]
    upload_of_a3 = next(i for i, p in enumerate(plans) if any(u.adapter_id == 3 for u in p.uploads))
    first_run_of_a3 = next(
        i for i, p in enumerate(plans) if any(a.adapter_id == 3 for a in p.adapters)
    )
    assert upload_of_a3 < first_run_of_a3  # it rode along a step of a1's, before it could run
    assert not any(a.adapter_id == 3 for a in plans[upload_of_a3].adapters)


async def test_logprobs_reach_only_the_requests_that_asked() -> None:
    # A step computes logprobs for every row once one row asks (the fake always does): what one
    # request asked must not change what another one gets.
    async with Harness() as h:
        h.enqueue("plain", PROMPTS[0], max_new_tokens=4, ignore_eos=True)
        h.enqueue("chosen", PROMPTS[1], max_new_tokens=4, ignore_eos=True, logprobs=True)
        h.enqueue("top", PROMPTS[2], max_new_tokens=4, ignore_eos=True, top_logprobs=1)
        await h.finished({"plain", "chosen", "top"})
    emitted = [m for m in h.tokenizer.msgs if isinstance(m, EmitTokens) and m.token_ids]
    for m in emitted:
        assert bool(m.logprobs) == (m.request_id != "plain"), m
        assert bool(m.top_logprobs) == (m.request_id == "top"), m
