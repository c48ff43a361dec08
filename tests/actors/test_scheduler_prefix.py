"""The scheduler with the prefix cache, over FakeRunner (its KV slots remember the adapter that
wrote them, so a read across adapters fails the step): repeated prompts and chat histories
prefill only their uncached tail (decode pages are cached too), adapters never share, `n`
identical prompts prefill once, preemption under tight memory keeps outputs exact, a flush and
an unload free what nobody uses, and `disable_radix_cache` computes everything."""

from __future__ import annotations

import asyncio

import pytest

from lorasrv.ids import AdapterId, OpId, SeqId
from lorasrv.messages import AdapterRetired, EmitTokens, FlushCache, StepPlan
from tests.actors.test_scheduler import Harness
from tests.fakes import fake_generate

PROMPT = list(range(5, 35))  # 30 tokens: 7 full pages of 4, then 2 tokens


def first_step(plans: list[StepPlan], seq_id: int) -> tuple[int, int]:
    """(context, new tokens) of a sequence's first step: what it found cached, what it computed."""
    for plan in plans:
        if any(new.seq_id == seq_id for new in plan.new_seqs):
            i = plan.seq_ids.index(SeqId(seq_id))
            return plan.context_lens[i], plan.query_lens[i]
    raise AssertionError(f"seq {seq_id} never ran")


def cached_tokens(h: Harness, rid: str) -> int:
    (last,) = [m for m in h.tokenizer.msgs
               if isinstance(m, EmitTokens) and m.request_id == rid
               and m.finish_reason]  # fmt: skip
    return last.cached_tokens


async def test_a_repeated_prompt_and_a_chat_history_prefill_only_their_tail() -> None:
    async with Harness(lora_rows=0) as h:
        h.enqueue("r0", PROMPT, max_new_tokens=6)
        out = await h.finished({"r0"})
        reply = out["r0"]
        h.enqueue("r1", [*PROMPT, 77], max_new_tokens=6)
        await h.finished({"r1"})
        # the next turn: the prompt, the reply, a new message (r0's decode pages are cached)
        turn = [*PROMPT, *reply, 9]
        h.enqueue("r2", turn, max_new_tokens=6)
        out = await h.finished({"r2"})
        assert out["r1"] == fake_generate([*PROMPT, 77], 0, 6)
        assert out["r2"] == fake_generate(turn, 0, 6)
        assert first_step(h.fake.plans, 0) == (0, 30)
        assert first_step(h.fake.plans, 1) == (28, 3)
        # r0 fed 35 tokens (prompt and 5 of its 6 replies): 8 full pages
        assert first_step(h.fake.plans, 2) == (32, len(turn) - 32)
        assert [cached_tokens(h, r) for r in ("r0", "r1", "r2")] == [0, 28, 32]
        assert h.num_pages_used == 0


async def test_adapters_and_the_base_model_never_share_cached_pages() -> None:
    async with Harness(cap=2) as h:
        order = [("a1", 101), ("a2", 102), (None, 0), ("a1", 101), ("a2", 102), (None, 0)]
        for i, (lora, _) in enumerate(order):  # one after the other: each finds the earlier
            h.enqueue(f"r{i}", PROMPT, lora, max_new_tokens=5)
            await h.finished({f"r{i}"})
        out = h.outputs()
        for i, (_, salt) in enumerate(order):
            assert out[f"r{i}"] == fake_generate(PROMPT, salt, 5)
        assert [cached_tokens(h, f"r{i}") for i in range(6)] == [0, 0, 0, 28, 28, 28]


async def test_n_identical_prompts_prefill_once() -> None:
    async with Harness(lora_rows=0) as h:
        for i in range(4):
            h.enqueue(f"s{i}", PROMPT, max_new_tokens=5)
        out = await h.finished({f"s{i}" for i in range(4)})
        assert all(out[f"s{i}"] == fake_generate(PROMPT, 0, 5) for i in range(4))
        assert [first_step(h.fake.plans, i) for i in range(4)] == [(0, 30)] + [(28, 2)] * 3
        prefill = sum(n for plan in h.fake.plans for n in plan.query_lens if n > 1)
        assert prefill == 30 + 3 * 2
        assert [cached_tokens(h, f"s{i}") for i in range(4)] == [0, 28, 28, 28]


@pytest.mark.parametrize(("pages", "budget"), [(12, 64), (9, 6)])
async def test_preemption_with_shared_prefixes_keeps_outputs_exact(pages: int, budget: int) -> None:
    prompts = [PROMPT[:13], [*PROMPT[:13], 1, 2], PROMPT[:14], [*PROMPT[:8], 3]]
    async with Harness(pages=pages, budget=budget, lora_rows=0) as h:
        for i, prompt in enumerate(prompts):
            h.enqueue(f"r{i}", prompt, max_new_tokens=12)
        out = await h.finished({f"r{i}" for i in range(len(prompts))})
        for i, prompt in enumerate(prompts):
            assert out[f"r{i}"] == fake_generate(prompt, 0, 12)
        assert len(h.fake.new_seqs()) > len(prompts), "nothing was preempted"
        assert h.num_pages_used == 0


async def test_a_flush_and_an_unload_free_the_pages_nobody_uses() -> None:
    async with Harness() as h:
        h.enqueue("r0", PROMPT, "a1", max_new_tokens=3)
        h.enqueue("r1", PROMPT, max_new_tokens=3)
        await h.finished({"r0", "r1"})
        cache = h.scheduler.planner.cache
        assert cache.num_pages == 2 * 8  # 32 of the 32 tokens each fed: 8 full pages each
        h.scheduler.send(AdapterRetired(adapter_id=AdapterId(1)))
        h.scheduler.send(FlushCache(op_id=OpId(7)))
        async with asyncio.timeout(5):
            while not h.flushed:
                await asyncio.sleep(0.002)
        assert cache.num_pages == 0
        assert [(f.op_id, f.num_pages) for f in h.flushed] == [(7, 8)]  # a1's 8 went at once
        assert h.scheduler.planner.arena.num_used_pages == 0


async def test_with_the_cache_off_every_prompt_is_computed() -> None:
    async with Harness(lora_rows=0, radix_cache=False) as h:
        for i in range(2):
            h.enqueue(f"r{i}", PROMPT, max_new_tokens=4)
            await h.finished({f"r{i}"})
        assert [first_step(h.fake.plans, i) for i in range(2)] == [(0, 30), (0, 30)]
        assert h.scheduler.planner.arena.num_used_pages == 0
        assert cached_tokens(h, "r1") == 0
