"""Engine with every real actor over FakeRunner and a character tokenizer: the whole lifecycle
(submit, batch, adapters, eviction, stop strings, abort, unload) through the typed API, without a
model. Waits are on observable state (stats, adapter states), never on a fixed sleep."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import pytest

from lorasrv.config import AdapterConfig, LoraRef, SchedulerConfig, ServerConfig
from lorasrv.engine.engine import Engine
from lorasrv.engine.parts import EngineParts
from lorasrv.engine.requests import Submission
from lorasrv.engine.results import RequestResult
from lorasrv.errors import AdapterNotFound, BadRequest, EngineDead, PromptTooLong
from lorasrv.messages import SamplingParams
from tests.fakes import FakeRunner, FakeTokenizer, fake_generate

SALTS = {"/ad/a": 11, "/ad/b": 22, "/ad/c": 33, "/ad/d": 44, "/ad/a2": 55}
WAIT_S = 5


class FakePeft(NamedTuple):
    path: str
    max_rank: int
    target_modules: tuple[str, ...]


def read_config(path: str) -> FakePeft:
    if path not in SALTS:  # as lorasrv.peft_config's AdapterNotFoundError
        raise FileNotFoundError(f"{path}: not an adapter folder (no adapter_config.json)")
    return FakePeft(path=path, max_rank=8, target_modules=("q_proj",))


def make_engine(
    *, slots: int = 2, pages: int = 128, loader: Callable[[str], object] | None = None,
    lora: bool = True, **adapter_cfg: Any,
) -> tuple[Engine, FakeRunner]:  # fmt: skip
    fake = FakeRunner(num_kv_pages=pages, page_size=4, num_slots=slots)
    config = ServerConfig(
        adapters=AdapterConfig(enable_lora=lora, max_loras_per_batch=slots, **adapter_cfg),
        scheduler=SchedulerConfig(chunked_prefill_size=32, max_running_requests=16),
    )
    parts = EngineParts(
        model_path="/fake/model",
        runner_factory=lambda: fake,
        tokenizer=FakeTokenizer(),
        read_adapter_config=read_config,
        make_adapter_loader=lambda runner: loader or SALTS.__getitem__,
        initial_adapters=(LoraRef(lora_name="a", lora_path="/ad/a"),) if lora else (),
        config=config,
    )
    return Engine(config, parts=parts), fake


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    eng, _ = make_engine()
    async with asyncio.timeout(5):
        await eng.start()
    yield eng
    await eng.stop()


def expect(text: str, salt: int, n: int) -> str:
    return "".join(chr(t) for t in fake_generate([ord(c) for c in text], salt, n))


GREEDY = SamplingParams(max_new_tokens=8, temperature=0)
LONG = SamplingParams(max_new_tokens=200, ignore_eos=True)


async def gen(
    engine: Engine, text: str, lora: str | None = None, params: SamplingParams = GREEDY
) -> RequestResult:
    return await engine.generate(Submission(text=text, lora_name=lora, params=params))


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not within {WAIT_S} s: {what}") from None


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """`wait_until` for state that takes a message round trip to read."""
    try:
        async with asyncio.timeout(WAIT_S):
            while not await check():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"not within {WAIT_S} s: {what}") from None


async def adapter(engine: Engine, name: str) -> Any:
    found = [s for s in await engine.describe_adapters() if s.name == name]
    return found[0] if found else None


async def test_mixed_batch_gets_each_rows_own_adapter(engine: Engine) -> None:
    assert (await engine.load_adapter("b", "/ad/b")).success
    assert (await engine.load_adapter("c", "/ad/c")).success  # 3 adapters, 2 slots
    prompts = ["hello", "hello", "hello", "other prompt", "x"]
    loras = ["a", None, "b", "c", "a"]
    async with asyncio.timeout(5):
        results = await asyncio.gather(
            *(gen(engine, p, lora) for p, lora in zip(prompts, loras, strict=True))
        )
    for prompt, lora, result in zip(prompts, loras, results, strict=True):
        salt = 0 if lora is None else SALTS[f"/ad/{lora}"]
        assert result.text == expect(prompt, salt, 8)
        assert list(result.token_ids) == [ord(c) for c in result.text]
        assert (result.finish_reason, result.completion_tokens) == ("length", 8)
        assert result.prompt_tokens == len(prompt)
    states = {a.name: a for a in await engine.describe_adapters()}
    assert set(states) == {"a", "b", "c"}
    assert all(a.num_refs == 0 for a in states.values())
    assert sum(a.num_evictions for a in states.values()) >= 1


async def test_deltas_add_up_to_the_result(engine: Engine) -> None:
    handle = engine.submit(Submission(text="abc", lora_name="a", params=GREEDY))
    deltas = [out async for out in handle]
    assert "".join(d.text for d in deltas) == expect("abc", 11, 8)
    assert [len(d.token_ids) for d in deltas] == [1] * 8
    assert deltas[-1].finished
    assert deltas[-1].finish_reason == "length"


async def test_stop_string_truncates_and_aborts_the_sequence() -> None:
    """A stop string is matched in the tokenizer, after the scheduler has moved on: the sequence
    must be aborted there, or it runs on to its length limit holding pages and a batch row."""
    eng, fake = make_engine()
    async with eng:
        full = expect("stop me", 0, 200)
        stop = full[5:7]
        at = full.find(stop)
        params = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True, stop=(stop,))
        result = await gen(eng, "stop me", params=params)
        assert result.text == full[:at]
        assert (result.finish_reason, result.matched_stop) == ("stop", stop)
        await wait_until(lambda: eng.last_stats.num_finished == 1, "the sequence ended")
        assert eng.last_stats.num_aborted == 1  # ended by the abort, not by its length limit
        assert eng.last_stats.num_kv_pages_used == 0
        (seq,) = fake.new_seqs()
        num_rows = sum(seq.seq_id in plan.seq_ids for plan in fake.plans)
        assert num_rows < 20, num_rows  # a few steps past the match, not 200


async def test_errors_surface_as_typed_exceptions(engine: Engine) -> None:
    with pytest.raises(AdapterNotFound):
        await gen(engine, "hi", "nope")
    with pytest.raises(PromptTooLong):
        await gen(engine, "y" * 300)
    with pytest.raises(BadRequest, match="temperature"):
        engine.submit(Submission(text="hi", params=SamplingParams(temperature=-1)))
    with pytest.raises(BadRequest, match="vocabulary"):
        engine.submit(Submission(input_ids=(1, 5000)))
    with pytest.raises(BadRequest, match="exactly one of"):
        engine.submit(Submission(text="hi", input_ids=(1,)))
    with pytest.raises(BadRequest, match="the prompt is empty"):
        engine.submit(Submission(text=""))
    engine.submit(Submission(text="one", request_id="same", params=LONG))
    with pytest.raises(BadRequest, match="already in use"):
        engine.submit(Submission(text="two", request_id="same"))
    engine.abort("same")
    assert (await gen(engine, "still serving")).text == expect("still serving", 0, 8)


async def test_lora_off_names_the_adapter_and_the_flag() -> None:
    eng, _ = make_engine(lora=False)
    async with eng:
        with pytest.raises(BadRequest, match=r"adapter 'x' requested.*--enable-lora"):
            eng.submit(Submission(text="hi", lora_name="x"))


async def test_cancelled_generate_aborts_and_releases() -> None:
    engine, fake = make_engine()
    fake.step_delay_s = 0.002  # simulated GPU time: 200 tokens take a while
    async with engine:
        task = asyncio.create_task(gen(engine, "long", "a", LONG))
        await wait_until(lambda: engine.last_stats.num_running == 1, "it runs")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: engine.last_stats.num_aborted == 1, "the scheduler aborted it")
        assert (await adapter(engine, "a")).num_refs == 0
        assert engine.last_stats.num_running == 0
        assert engine.request_ids() == ()


async def test_an_abort_by_id_ends_the_readers_stream() -> None:
    engine, fake = make_engine()
    fake.step_delay_s = 0.002  # simulated GPU time: 200 tokens take a while
    async with engine:
        await _abort_by_id(engine)


async def _abort_by_id(engine: Engine) -> None:
    handle = engine.submit(Submission(text="long", request_id="r1", params=LONG))
    first = await anext(handle)
    engine.abort("r1")  # from elsewhere (SGLang's /abort_request), not through the handle
    rest = [out async for out in handle]
    assert not first.finished
    assert rest[-1].finished
    assert rest[-1].finish_reason == "abort"
    await wait_until(lambda: engine.last_stats.num_aborted == 1, "the scheduler aborted it")


async def test_aborted_while_waiting_for_its_adapter_releases_the_reference() -> None:
    """Aborted while its adapter's first load is in flight: the reference granted when the load
    finishes must be released, or unloading that adapter waits forever."""
    loaded = threading.Event()

    def slow_loader(path: str) -> object:
        if path == "/ad/d":
            assert loaded.wait(WAIT_S), "the test never let the load finish"
        return SALTS[path]

    eng, _ = make_engine(loader=slow_loader)
    async with eng:
        load = asyncio.create_task(eng.load_adapter("d", "/ad/d"))

        async def loading() -> bool:
            status = await adapter(eng, "d")
            return status is not None and status.state == "loading"

        await eventually(loading, "adapter d is loading")
        handle = eng.submit(Submission(text="x", lora_name="d", params=GREEDY))
        await wait_until(lambda: eng.last_stats.num_acquiring == 1, "it waits for adapter d")
        handle.abort()
        await wait_until(lambda: eng.last_stats.num_aborted == 1, "the scheduler aborted it")
        loaded.set()
        assert (await load).success
        assert (await eng.unload_adapter("d")).success

        async def drained() -> bool:  # the unload finishes once no request holds d
            return await adapter(eng, "d") is None

        await eventually(drained, "adapter d drained (its last reference released)")
        assert eng.last_stats.num_running == 0


async def test_unload_then_reload_same_name_uses_new_weights(engine: Engine) -> None:
    assert (await gen(engine, "q", "a")).text == expect("q", 11, 8)
    assert (await engine.unload_adapter("a")).success
    with pytest.raises(AdapterNotFound):
        await gen(engine, "q", "a")
    assert (await engine.load_adapter("a", "/ad/a2")).success
    assert (await gen(engine, "q", "a")).text == expect("q", 55, 8)
    with pytest.raises(AdapterNotFound, match=r"adapter_config\.json"):
        await engine.load_adapter("zzz", "/not/there")
    assert await adapter(engine, "zzz") is None


async def test_many_concurrent_requests_over_few_slots_all_finish() -> None:
    eng, fake = make_engine(slots=2, pages=40)
    async with eng:
        for name in ("b", "c", "d"):
            assert (await eng.load_adapter(name, f"/ad/{name}")).success
        names = ["a", "b", "c", "d", None] * 6
        texts = [f"p{i:02d}" * (1 + i % 3) for i in range(len(names))]
        params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
        async with asyncio.timeout(20):
            results = await asyncio.gather(
                *(gen(eng, t, n, params) for t, n in zip(texts, names, strict=True))
            )
        for t, n, r in zip(texts, names, results, strict=True):
            assert r.text == expect(t, 0 if n is None else SALTS[f"/ad/{n}"], 12)
        # 4 adapters through 2 slots: slots were reused, so eviction happened mid-traffic.
        assert fake.num_loads >= 4
        states = await eng.describe_adapters()
        assert sum(a.num_evictions for a in states) >= 2
        assert all(a.num_refs == 0 for a in states)


async def test_crashed_actor_marks_engine_dead() -> None:
    eng, fake = make_engine()
    async with eng:
        fake.fail_at_step = 1
        with pytest.raises(EngineDead, match="fake GPU failure"):
            await gen(eng, "x")
        assert not eng.is_healthy()
        assert eng.failure is not None
        assert "fake GPU failure" in eng.failure
        with pytest.raises(EngineDead):
            eng.submit(Submission(text="after"))


async def test_oldest_waiting_adapter_gets_a_slot_under_steady_load() -> None:
    """Two slots kept busy by a steady stream for adapters a and b: a request for c still runs
    within a bounded number of steps (it is never starved by later arrivals)."""
    eng, fake = make_engine(slots=2, pages=256)
    async with eng:
        for name in ("b", "c"):
            assert (await eng.load_adapter(name, f"/ad/{name}")).success
        stop = asyncio.Event()
        params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)

        async def steady(name: str, num_new: int) -> None:
            # Different lengths keep the stream staggered: some row of a and of b always runs.
            sampling = SamplingParams(max_new_tokens=num_new, temperature=0, ignore_eos=True)
            while not stop.is_set():
                await gen(eng, f"load {name}", name, sampling)

        lengths = (5, 7, 9, 11)
        workers = [asyncio.create_task(steady(n, k)) for n in ("a", "b") for k in lengths]

        async def both_resident() -> bool:
            slots = {s.name: s.slot for s in await eng.describe_adapters()}
            return slots["a"] is not None and slots["b"] is not None

        await eventually(both_resident, "the two slots are held by a and b")
        start_step = len(fake.plans)
        async with asyncio.timeout(10):
            result = await gen(eng, "starving", "c", params)
        steps_waited = len(fake.plans) - start_step
        stop.set()
        await asyncio.gather(*workers)
        assert result.text == expect("starving", SALTS["/ad/c"], 8)
        # starvation threshold (16 steps) + draining rows of a/b (<= 11) + its own 1 + 8 steps
        assert steps_waited <= 45, steps_waited
