"""Engine with every real actor over FakeRunner and a character tokenizer: the whole lifecycle
(submit, batch, adapters, eviction, stop strings, abort, unload) without a model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest

from lorasrv.config import AdapterConfig, LoraRef, SchedulerConfig, ServerConfig
from lorasrv.engine.engine import Engine
from lorasrv.engine.parts import EngineParts
from lorasrv.errors import AdapterNotFound, BadRequest, EngineDead, PromptTooLong
from tests.fakes import FakeRunner, FakeTokenizer, fake_generate

SALTS = {"/ad/a": 11, "/ad/b": 22, "/ad/c": 33, "/ad/d": 44, "/ad/a2": 55}


class FakePeft(NamedTuple):
    path: str
    max_rank: int
    target_modules: tuple[str, ...]
    scaling: float = 1.0


def read_config(path: str) -> FakePeft:
    if path not in SALTS:
        raise ValueError(f"{path}: not an adapter folder (no adapter_config.json)")
    return FakePeft(path=path, max_rank=8, target_modules=("q_proj",))


def make_engine(
    *, slots: int = 2, pages: int = 128, context: int = 256, **adapter_cfg: Any
) -> tuple[Engine, FakeRunner]:
    """`slots` rank-8 adapters fit in the arena's rows, and at most that many run at once."""
    fake = FakeRunner(num_kv_pages=pages, page_size=4, context_length=context,
                      lora_rows=8 * slots, salts=SALTS)  # fmt: skip
    adapter_cfg = {"max_loras_per_batch": slots, **adapter_cfg}
    config = ServerConfig(
        adapters=AdapterConfig(enable_lora=True, **adapter_cfg),
        scheduler=SchedulerConfig(chunked_prefill_size=32, max_running_requests=16),
    )
    parts = EngineParts(
        model_path="/fake/model",
        runner_factory=lambda: fake,
        tokenizer=FakeTokenizer(),
        read_adapter_config=read_config,
        initial_adapters=(LoraRef(lora_name="a", lora_path="/ad/a"),),
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


GREEDY = {"max_new_tokens": 8, "temperature": 0}


async def test_mixed_batch_gets_each_rows_own_adapter(engine: Engine) -> None:
    assert (await engine.load_adapter("b", "/ad/b")).success
    assert (await engine.load_adapter("c", "/ad/c")).success  # 3 adapters, 2 slots
    prompts = ["hello", "hello", "hello", "other prompt", "x"]
    loras = ["a", None, "b", "c", "a"]
    async with asyncio.timeout(5):
        results = await engine.generate(text=prompts, lora_path=loras, sampling_params=GREEDY)
    assert isinstance(results, list)
    for prompt, lora, result in zip(prompts, loras, results, strict=True):
        salt = 0 if lora is None else SALTS[f"/ad/{lora}"]
        assert result["text"] == expect(prompt, salt, 8)
        assert result["output_ids"] == [ord(c) for c in result["text"]]
        assert result["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
        assert result["meta_info"]["prompt_tokens"] == len(prompt)
    states = {a.name: a for a in await engine.describe_adapters()}
    assert set(states) == {"a", "b", "c"}
    assert all(a.num_refs == 0 for a in states.values())
    assert sum(a.num_gpu_evictions for a in states.values()) >= 1


async def test_stream_is_cumulative_and_matches_generate(engine: Engine) -> None:
    chunks = [c async for c in engine.stream(text="abc", lora_path="a", sampling_params=GREEDY)]
    assert chunks[-1]["text"] == expect("abc", 11, 8)
    assert all(chunks[-1]["text"].startswith(c["text"]) for c in chunks)
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"


async def test_stop_string_truncates_and_frees(engine: Engine) -> None:
    full = expect("stop me", 0, 20)
    stop = full[5:7]
    at = full.find(stop)
    result = await engine.generate(
        text="stop me", sampling_params={"max_new_tokens": 20, "temperature": 0, "stop": stop}
    )
    assert isinstance(result, dict)
    assert result["text"] == full[:at]
    assert result["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    await asyncio.sleep(0.05)
    assert engine.last_stats.num_kv_pages_used == 0


async def test_errors_surface_as_typed_exceptions(engine: Engine) -> None:
    with pytest.raises(AdapterNotFound):
        await engine.generate(text="hi", lora_path="nope")
    with pytest.raises(PromptTooLong):
        await engine.generate(text="y" * 300)
    with pytest.raises(BadRequest, match="temperature"):
        await engine.generate(text="hi", sampling_params={"temperature": -1})
    with pytest.raises(BadRequest, match="vocabulary"):
        await engine.generate(input_ids=[1, 5000])
    ok = await engine.generate(text="still serving", sampling_params=GREEDY)
    assert isinstance(ok, dict)
    assert ok["text"] == expect("still serving", 0, 8)


async def test_cancelled_generate_aborts_and_releases() -> None:
    engine, fake = make_engine()
    fake.step_delay_s = 0.002
    async with engine:
        await _cancel_midway(engine)


async def _cancel_midway(engine: Engine) -> None:
    task = asyncio.create_task(
        engine.generate(text="long", lora_path="a",
                        sampling_params={"max_new_tokens": 200, "ignore_eos": True})
    )  # fmt: skip
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    (a,) = [s for s in await engine.describe_adapters() if s.name == "a"]
    assert a.num_refs == 0
    assert engine.last_stats.num_running == 0


async def test_unload_then_reload_same_name_uses_new_weights(engine: Engine) -> None:
    first = await engine.generate(text="q", lora_path="a", sampling_params=GREEDY)
    assert isinstance(first, dict)
    assert first["text"] == expect("q", 11, 8)
    assert (await engine.unload_adapter("a")).success
    with pytest.raises(AdapterNotFound):
        await engine.generate(text="q", lora_path="a")
    assert (await engine.load_adapter("a", "/ad/a2")).success
    second = await engine.generate(text="q", lora_path="a", sampling_params=GREEDY)
    assert isinstance(second, dict)
    assert second["text"] == expect("q", 55, 8)
    bad = await engine.load_adapter("zzz", "/not/there")
    assert not bad.success
    assert "adapter_config.json" in bad.error_message
    assert "zzz" not in bad.loaded_adapters


async def test_many_concurrent_requests_over_few_slots_all_finish() -> None:
    eng, fake = make_engine(slots=2, pages=40, context=64)  # KV: 16 pages, rows: the rest
    async with eng:
        for name in ("b", "c", "d"):
            assert (await eng.load_adapter(name, f"/ad/{name}")).success
        names = ["a", "b", "c", "d", None] * 6
        texts = [f"p{i:02d}" * (1 + i % 3) for i in range(len(names))]
        async with asyncio.timeout(20):
            results = await asyncio.gather(*(
                eng.generate(text=t, lora_path=n, sampling_params={"max_new_tokens": 12,
                             "temperature": 0, "ignore_eos": True})
                for t, n in zip(texts, names, strict=True)
            ))  # fmt: skip
        for t, n, r in zip(texts, names, results, strict=True):
            assert isinstance(r, dict)
            assert r["text"] == expect(t, 0 if n is None else SALTS[f"/ad/{n}"], 12)
        # 4 adapters through rows for 2: rows were reused, so eviction happened mid-traffic.
        assert fake.num_uploads >= 4
        states = await eng.describe_adapters()
        assert sum(a.num_gpu_evictions for a in states) >= 2
        assert all(a.num_refs == 0 for a in states)


async def test_crashed_actor_marks_engine_dead() -> None:
    eng, fake = make_engine()
    async with eng:

        def boom(plan: object) -> Any:
            raise RuntimeError("kernel exploded")

        fake.step = boom  # type: ignore[method-assign]
        with pytest.raises(EngineDead):
            await eng.generate(text="x")
        assert not eng.is_healthy()
        assert eng.failure is not None
        assert "kernel exploded" in eng.failure


async def test_oldest_waiting_adapter_gets_a_slot_under_steady_load() -> None:
    """Two adapters a batch, kept busy by a steady stream for adapters a and b: a request for c
    still runs within a bounded number of steps (it is never starved by later arrivals)."""
    eng, fake = make_engine(slots=2, pages=256)
    async with eng:
        for name in ("b", "c"):
            assert (await eng.load_adapter(name, f"/ad/{name}")).success
        stop = asyncio.Event()
        params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}

        async def steady(name: str, num_new: int) -> None:
            # Different lengths keep the stream staggered: some row of a and of b always runs.
            sampling = {**params, "max_new_tokens": num_new}
            while not stop.is_set():
                await eng.generate(text=f"load {name}", lora_path=name, sampling_params=sampling)

        lengths = (5, 7, 9, 11)
        workers = [asyncio.create_task(steady(n, k)) for n in ("a", "b") for k in lengths]
        await asyncio.sleep(0.05)  # the batch's two adapters are now a and b
        start_step = len(fake.plans)
        async with asyncio.timeout(10):
            result = await eng.generate(text="starving", lora_path="c", sampling_params=params)
        steps_waited = len(fake.plans) - start_step
        stop.set()
        await asyncio.gather(*workers)
        assert isinstance(result, dict)
        assert result["text"] == expect("starving", SALTS["/ad/c"], 8)
        # starvation threshold (16 steps) + draining rows of a/b (<= 11) + its own 1 + 8 steps
        assert steps_waited <= 45, steps_waited


async def test_server_info_shows_the_effective_adapters_per_batch() -> None:
    capped, _ = make_engine(slots=2)
    memory, _ = make_engine(slots=3, max_loras_per_batch=None)
    for engine, expected in ((capped, 2), (memory, 3)):  # 3: the rows hold three at rank 8
        async with engine:
            info = await engine.server_info()
            assert info["max_loras_per_batch_effective"] == expected
            assert info["scheduler"]["lora_capacity"] == expected
            assert info["scheduler"]["num_lora_rows"] == 8 * 3 if expected == 3 else 16
