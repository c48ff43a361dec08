"""The prefix cache through the real Engine and the real model runner (tiny model, float32, CPU):
greedy outputs with the cache on equal those with it off across a shared system prompt under
mixed adapters and the base model, chat turns that extend earlier ones, `n` identical prompts,
reloads of a name with other weights (in place, and unload then load: a fresh adapter version
each time), a flush, and a small arena where cached pages are evicted and requests preempted.
Two mutants of the cache's key (no adapter; the name's first version instead of the current
one) change the outputs, so these comparisons would catch them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lorasrv.config import build_config
from lorasrv.engine import prefix_pages
from lorasrv.engine.engine import Engine
from lorasrv.engine.parts import prepare_parts
from lorasrv.engine.requests import Submission
from lorasrv.engine.sequence import Sequence
from lorasrv.engine.step_runner import PendingStep
from lorasrv.ids import AdapterId
from lorasrv.messages import SamplingParams, StepPlan
from lorasrv.model.runner import ModelRunner
from tests.e2e.conftest import make_checkpoint
from tests.model.checkpoints import ADAPTERS, build_adapter

SYSTEM = [5, 9, 200, 77, 31, 8, 120, 64, 3, 99, 15, 42, 600, 17, 250, 12, 90, 33, 71, 5, 8, 910]
TAILS = [[27, 44], [300, 18, 63], [2, 81, 7, 7]]
NAMES = (None, "qv", "all")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix")
    base = make_checkpoint(root)
    folders = {"qv": ("qv_r4", 1), "qv2": ("qv_r4", 11), "all": ("all_r8_rslora", 2),
               "all2": ("all_r8_rslora", 12)}  # fmt: skip
    world = {"base": base}
    for name, (kind, seed) in folders.items():
        world[name] = build_adapter(base, root / name, **{**ADAPTERS[kind], "seed": seed})
    return world


class Run:
    """One engine's outputs, and how much its cache served."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.outputs: list[list[int]] = []
        self.cached = 0
        self.evicted = 0

    async def wave(self, rows: list[tuple[list[int], str | None]], num_new: int = 8) -> None:
        """Requests at once; each output recorded in order."""
        params = SamplingParams(max_new_tokens=num_new, temperature=0, ignore_eos=True)
        handles = [
            self.engine.submit(Submission(input_ids=tuple(p), lora_name=name, params=params))
            for p, name in rows
        ]
        results = await asyncio.gather(*(h.result() for h in handles))
        self.outputs += [list(r.token_ids) for r in results]
        self.cached += sum(r.cached_tokens for r in results)


#: A reloaded version's id -> the name's first one (the "name" mutant reads it).
FIRST_VERSION: dict[AdapterId, AdapterId] = {}


async def versions(engine: Engine) -> dict[str, AdapterId]:
    return {a.name: a.adapter_id for a in await engine.describe_adapters() if a.phase == "ready"}


async def scenario(world: dict[str, Path], *, pages: int, cache: bool, **options: Any) -> Run:
    config = build_config({
        "model_path": str(world["base"]), "device": "cpu", "dtype": "float32", "page_size": 4,
        "num_kv_pages": pages, "chunked_prefill_size": 24, "port": 0, "max_running_requests": 8,
        "max_lora_rank": 8, "lora_target_modules": ["all"], "enable_lora": True,
        "context_length": 96, "max_loras_per_batch": 2,
        "lora_backend": "torch", "disable_radix_cache": not cache, **options,
    })  # fmt: skip
    async with asyncio.timeout(600), Engine(config) as engine:
        await engine.load_adapter("qv", str(world["qv"]))
        await engine.load_adapter("all", str(world["all"]))
        run = Run(engine)
        first = [([*SYSTEM, *tail], name) for tail in TAILS for name in NAMES]
        await run.wave(first)  # one system prompt, three adapters: computed three times
        replies = run.outputs[-len(first) :]
        await run.wave([([*SYSTEM, 1, *tail], name) for tail in TAILS for name in NAMES])
        # the next turn of each chat: its prompt, its reply, a new message
        await run.wave(
            [([*p, *r, 400, 23], name) for (p, name), r in zip(first, replies, strict=True)]
        )
        await run.wave([([*SYSTEM, 11, 13], "all")] * 3)  # SGLang's n = 3
        before = await versions(engine)
        # a long request keeps qv's first version (and its cached pages) while it drains
        long = engine.submit(Submission(input_ids=(*SYSTEM, 1), lora_name="qv", params=(
            SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True))))  # fmt: skip
        await engine.load_adapter("qv", str(world["qv2"]), replace=True)  # load_inplace
        await engine.unload_adapter("all")
        await engine.load_adapter("all", str(world["all2"]))
        after = await versions(engine)
        assert all(after[name] != before[name] for name in ("qv", "all"))
        FIRST_VERSION.update({after[name]: before[name] for name in ("qv", "all")})
        await run.wave(first)  # same prompts, other weights under the same names
        assert any(a.adapter_id == before["qv"] for a in await engine.describe_adapters()), (
            "qv's first version drained before the new one ran: the scenario tests nothing"
        )
        run.outputs.append(list((await long.result()).token_ids))
        run.evicted = engine.last_stats.num_cached_pages_evicted
        await engine.flush_cache()
        await run.wave(first[:3])
    return run


@pytest.fixture(scope="module")
def reference(world: dict[str, Path]) -> Run:
    return asyncio.run(scenario(world, pages=256, cache=False))


def test_outputs_with_the_cache_equal_outputs_without_it(
    world: dict[str, Path], reference: Run
) -> None:
    assert reference.cached == 0
    assert len({tuple(o) for o in reference.outputs[:9]}) >= 7, "adapters change the output"
    run = asyncio.run(scenario(world, pages=256, cache=True))
    assert run.outputs == reference.outputs
    assert run.cached >= 3 * 9 * 20, "the waves after the first found their prefixes cached"


def test_evictions_and_preemptions_keep_outputs_equal(
    world: dict[str, Path], reference: Run, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lorasrv.engine.scheduler")
    # rows of ~4 pages; the adapter floor keeps 16 of them: KV gets 40 pages, ~4 sequences
    run = asyncio.run(scenario(world, pages=104, cache=True))
    assert run.outputs == reference.outputs
    assert any("preempted" in r.message for r in caplog.records), "nothing was preempted"
    assert run.evicted > 0, "no cached page was evicted"
    assert run.cached > 0


def test_tensor_parallel_with_the_cache_equals_one_rank_without_it(
    world: dict[str, Path], reference: Run
) -> None:
    """Page ids are global: every rank reads the shared pages of a row's block table."""
    run = asyncio.run(scenario(world, pages=256, cache=True, tp_size=2))
    assert run.outputs == reference.outputs
    assert run.cached > 0


def _no_adapter(seq: Sequence) -> AdapterId | None:
    return None


def _first_version(seq: Sequence) -> AdapterId | None:
    """The adapter's name instead of its version: a reload keeps the first load's id."""
    if seq.adapter_id is None:
        return None
    return FIRST_VERSION.get(seq.adapter_id, seq.adapter_id)


@pytest.mark.parametrize("key", [_no_adapter, _first_version], ids=["no-adapter", "name"])
def test_a_key_without_the_adapter_version_changes_the_outputs(
    world: dict[str, Path], reference: Run, monkeypatch: pytest.MonkeyPatch,
    key: Callable[[Sequence], Any],
) -> None:  # fmt: skip
    monkeypatch.setattr(prefix_pages, "namespace_of", key)
    run = asyncio.run(scenario(world, pages=256, cache=True))
    assert run.outputs != reference.outputs


class CountingRunner(ModelRunner):
    """Counts decode steps on the static path and steps whose inputs are read on the device."""

    num_static = 0
    num_overlapped = 0

    def launch(self, plan: StepPlan) -> PendingStep:
        if plan.is_decode and self.decode is not None and self.decode.can_run(plan):
            self.num_static += 1
        self.num_overlapped += any(plan.device_inputs)
        return super().launch(plan)


async def static_decode_run(world: dict[str, Path], *, cache: bool) -> list[list[int]]:
    """The Triton kernels (interpreted) on the static decode path that CUDA graphs replay, under
    the overlap schedule (decode rows reading their last token on the device): shared pages in
    the static block tables."""
    config = build_config({
        "model_path": str(world["base"]), "device": "cpu", "dtype": "float32", "page_size": 4,
        "num_kv_pages": 128, "chunked_prefill_size": 24, "port": 0, "context_length": 64,
        "max_lora_rank": 8, "lora_target_modules": ["all"], "enable_lora": True,
        "max_loras_per_batch": 2, "disable_radix_cache": not cache,
    })  # fmt: skip
    parts = await prepare_parts(config)
    built: list[CountingRunner] = []

    def build() -> ModelRunner:
        built.append(CountingRunner(
            model_path=str(world["base"]), device="cpu", dtype="float32", page_size=4,
            num_kv_pages=128, context_length=64, enable_lora=True, lora_max_rank=8,
            lora_target_modules=("all",), lora_backend="triton", attention_backend="triton",
        ))  # fmt: skip
        return built[-1]

    async with (
        asyncio.timeout(600),
        Engine(config, parts=parts._replace(runner_factory=build)) as e,
    ):
        await e.load_adapter("qv", str(world["qv"]))
        await e.load_adapter("all", str(world["all"]))
        run = Run(e)
        first = [([*SYSTEM, *TAILS[0]], name) for name in NAMES]
        await run.wave(first, num_new=5)
        await run.wave([([*SYSTEM, 1, 2], name) for name in NAMES], num_new=5)
        await run.wave([([*SYSTEM, 11, 13], "qv")] * 2, num_new=5)
        assert run.cached >= (3 + 2) * 20 if cache else run.cached == 0
    assert built[0].num_static > 0, "no decode step ran on the static path"
    assert built[0].num_overlapped > 0, "no step read its inputs on the device"
    return run.outputs


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU need TRITON_INTERPRET=1 set before Python starts",
)
def test_the_static_decode_path_with_the_cache_equals_it_without(world: dict[str, Path]) -> None:
    expected = asyncio.run(static_decode_run(world, cache=False))
    assert asyncio.run(static_decode_run(world, cache=True)) == expected
