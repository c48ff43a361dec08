"""The hot A cache (hot_slots.py, hot_cache.py): where adapters go in the hot rows (fit, LRU,
stale entries, fragmentation), the cost rule, the stacked backend against the dense definition
with NaN in every hot row no adapter holds, and whole runs through ModelRunner against PEFT with
the hot path on: adapters that fit and do not, rows reused by another adapter, an adapter id's
rows rewritten in place.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lorasrv.ids import AdapterId, StepId
from lorasrv.messages import AdapterRows, StepPlan
from lorasrv.model.arch import parse_arch
from lorasrv.model.hot_cache import HotCache, hot_rows_for, make_hot_cache
from lorasrv.model.hot_slots import HotEntry, HotSlots
from lorasrv.model.layers import LoraLinear
from lorasrv.model.lora_backend import (
    AdapterInfo,
    LoraSegments,
    LoraStep,
    OpsBackend,
    lora_segments,
    make_lora_backend,
)
from lorasrv.model.lora_layout import pool_module_shapes, row_layout
from lorasrv.model.runner import ModelRunner
from lorasrv.model.uploads import Uploader
from tests.model.plan_driver import PlanDriver
from tests.model.test_lora_backend import BACKENDS, CPU, MAX_RANK, World
from tests.model.test_lora_vs_peft import peft_greedy

A, B, C, D = (AdapterId(i) for i in range(4))


def fresh(_entry: HotEntry) -> bool:
    return True


# ---------------------------------------------------------------------------- placement


def test_adapters_that_fit_are_placed_once_and_kept() -> None:
    slots = HotSlots(32)
    first = slots.place({A: (5, 6, 7, 8), B: tuple(range(10, 26))}, 0, fresh)
    assert first is not None
    assert first.starts == {A: 0, B: 4}
    assert first.fills == [(0, (5, 6, 7, 8)), (4, tuple(range(10, 26)))]
    again = slots.place({B: tuple(range(10, 26))}, 1, fresh)
    assert again is not None
    assert again.starts == {B: 4}
    assert again.fills == []  # nothing copied twice
    assert slots.place({A: tuple(range(17)), B: tuple(range(10, 26))}, 2, fresh) is None  # 33
    slots.check()


def test_least_recently_used_goes_first_and_only_as_needed() -> None:
    slots = HotSlots(16)
    for adapter in (C, A, B):  # hot rows 0-1, 2-3, 4-5
        assert slots.place({adapter: (adapter, 100 + adapter)}, 0, fresh) is not None
    slots.place({A: (0, 100), C: (2, 102)}, 0, fresh)  # used again: B is now the oldest
    placed = slots.place({D: tuple(range(200, 212))}, 0, fresh)  # 12 rows: 10 free in a run
    assert placed is not None
    assert placed.starts == {D: 4}
    assert set(slots.entries) == {A, C, D}  # B alone went
    placed = slots.place({B: (1, 101), D: tuple(range(200, 212))}, 0, fresh)
    assert placed is not None
    assert set(slots.entries) == {B, C, D}  # A, the oldest but not wanted, made room
    slots.check()


def test_stale_entries_and_moved_rows_are_copied_again() -> None:
    slots = HotSlots(16)
    slots.place({A: (1, 2), B: (3, 4)}, 5, fresh)
    placed = slots.place({A: (1, 2), B: (3, 4)}, 6, lambda e: e.rows != (3, 4))  # B rewritten
    assert placed is not None
    assert placed.fills == [(placed.starts[B], (3, 4))]
    assert slots.entries[B].serial == 6
    placed = slots.place({A: (9, 2)}, 7, fresh)  # A now lives in other rows
    assert placed is not None
    assert placed.fills == [(placed.starts[A], (9, 2))]


def test_fragmented_hot_rows_are_repacked() -> None:
    slots = HotSlots(8)
    slots.place({A: (0, 1), B: (2, 3), C: (4, 5), D: (6, 7)}, 0, fresh)
    placed = slots.place({A: (0, 1), C: (4, 5), B: (10, 11, 12, 13)}, 1, fresh)
    # B grew to 4 rows: 8 fit in total but no run of 4 is free once D goes -> start over
    assert placed is not None
    assert sorted(placed.starts.values()) == [0, 2, 4]
    assert len(placed.fills) == 3
    slots.check()


def test_random_steps_keep_entries_disjoint_and_current() -> None:
    rng = random.Random(0)
    slots = HotSlots(48)
    rows = {AdapterId(a): tuple(range(100 * a, 100 * a + rng.choice([4, 8, 16]))) for a in range(9)}
    for serial in range(400):
        wanted = {a: rows[a] for a in rng.sample(sorted(rows), rng.randint(1, 4))}
        if rng.random() < 0.1:  # an adapter moves to other rows
            a = rng.choice(sorted(rows))
            rows[a] = tuple(r + 1000 for r in rows[a])
        wanted = {a: rows[a] for a in wanted}
        placed = slots.place(wanted, serial, fresh)
        fits = sum(map(len, wanted.values())) <= 48
        assert (placed is not None) == fits
        slots.check()
        if placed is not None:
            for a, start in placed.starts.items():
                assert slots.entries[a] == HotEntry(start, rows[a], slots.entries[a].serial)


# ---------------------------------------------------------------------------- cost rule


class _Model:
    """lora_linears() of a model of this shape (meta tensors: no memory)."""

    def __init__(self, hidden: int, inter: int, heads: int, kv_heads: int, head_dim: int) -> None:
        self.arch = parse_arch({
            "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "num_hidden_layers": 2,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "intermediate_size": inter, "vocab_size": 64,
        })  # fmt: skip

    def lora_linears(self) -> Any:
        for layer in range(2):
            for name, shape in pool_module_shapes(self.arch).items():
                weight = torch.empty(shape.out_features, shape.in_features, device="meta")
                yield layer, name, LoraLinear(weight, None, shape.slice_sizes)


@pytest.mark.parametrize(
    ("shape", "targets", "rows"),
    [
        ((4096, 14336, 32, 8, 128), ("all",), 128),  # Llama-3-8B: 140 by the share -> 128
        ((8192, 28672, 64, 8, 128), ("all",), 256),  # Llama-3-70B: 275 -> the cap
        ((4096, 14336, 32, 8, 128), ("q_proj", "v_proj"), 256),  # q/k/v rows only: cheap
        ((40, 56, 4, 2, 10), ("all",), 128),  # tiny: the floor (8 adapters of rank 16)
    ],
)
def test_cost_rule(shape: tuple[int, ...], targets: tuple[str, ...], rows: int) -> None:
    from lorasrv.model.startup import lora_target_modules

    model = _Model(*shape)
    layout = row_layout(model.arch, lora_target_modules(targets))
    assert hot_rows_for(model, layout) == rows  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the backend


class _Linears:
    """One layer of LoraLinears over the World's tiny arch (CPU float32)."""

    def __init__(self, world: World) -> None:
        gen = torch.Generator().manual_seed(3)
        self.linears = {
            name: LoraLinear(torch.randn(s.out_features, s.in_features, generator=gen),
                             torch.randn(s.out_features, generator=gen), s.slice_sizes)
            for name, s in pool_module_shapes(world.arch).items()
        }  # fmt: skip

    def lora_linears(self) -> Any:
        for name, linear in self.linears.items():
            yield 0, name, linear


def world_plan(world: World) -> StepPlan:
    """The World's segments as a plan: 3 base rows, then adapters 0, 1, 2 over 2, 1, 4 rows."""
    indices = (-1, -1, -1, 0, 0, 1, 2, 2, 2, 2)
    adapters = tuple(AdapterRows(AdapterId(i), rows) for i, rows in enumerate(world.rows))
    return StepPlan(step_id=StepId(0), lora_adapters=indices, adapters=adapters)


def world_segments(world: World, plan: StepPlan, query_lens: list[int]) -> LoraSegments:
    info = {AdapterId(i): AdapterInfo(w.rank, w.scaling) for i, w in enumerate(world.adapters)}
    segments = lora_segments(plan, query_lens, info)
    assert segments is not None
    return segments


def hot_world(name: str, hot_rows: int = 32) -> tuple[World, _Linears, HotCache]:
    world = World()
    layer = _Linears(world)
    backend = make_lora_backend(name, CPU, MAX_RANK)
    assert isinstance(backend, OpsBackend)
    hot = HotCache(layer, world.pool.layout, backend, num_rows=hot_rows)  # type: ignore[arg-type]
    for _, name_, linear in layer.lora_linears():
        module = world.pool.module(0, name_)
        assert module is not None
        linear.lora = module._replace(hot=hot.modules[0, name_])
        # every hot row NaN: the rows the step's adapters get are copied over, the rest stay
        hot.modules[0, name_].stacked[linear.weight.shape[0] :] = math.nan
    hot.attach(world.pool, Uploader(world.pool, CPU))
    return world, layer, hot


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("module", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
def test_stacked_linear_matches_the_dense_definition(name: str, module: str) -> None:
    world, layer, hot = hot_world(name)
    plan = world_plan(world)
    segments = world_segments(world, plan, [1] * 10)
    stacked = hot.place(plan, segments, 10)
    assert stacked is not None
    assert hot.num_fills == 3
    assert sorted(stacked.seg_v_col[1:]) == [0, 3, 19]  # ranks 3, 16, 7 side by side
    step = LoraStep(hot.backend, hot.backend.prepare(stacked, CPU))
    linear = layer.linears[module]
    x = torch.randn(10, linear.weight.shape[1], generator=torch.Generator().manual_seed(5))
    y = linear.forward(x, step)
    assert bool(torch.isfinite(y).all()), "a NaN hot row leaked"
    dense = world.dense(x, module, linear.weight)
    torch.testing.assert_close(y, dense + linear.bias, atol=1e-4, rtol=1e-4)
    lora = linear.lora
    assert lora is not None
    # no bias asked, none added (a TP rank leaves a row-parallel bias to rank 0)
    torch.testing.assert_close(step.linear(x, linear.weight, None, lora), dense, atol=1e-4,
                               rtol=1e-4)  # fmt: skip
    if module == "gate_up_proj":
        act = step.gate_up_act(x, linear.weight, lora)
        gate, up = world.dense(x, module, linear.weight).chunk(2, dim=-1)
        assert act is not None
        torch.testing.assert_close(act, F.silu(gate) * up, atol=1e-4, rtol=1e-4)


def test_steps_that_do_not_fit_or_are_long_take_the_rows() -> None:
    world, _, hot = hot_world("torch", hot_rows=24)  # ranks 3 + 16 + 7 = 26
    plan = world_plan(world)
    segments = world_segments(world, plan, [1] * 10)
    assert hot.place(plan, segments, 10) is None
    small = StepPlan(step_id=StepId(1), lora_adapters=(0, 0), adapters=plan.adapters[:1])
    small_segments = world_segments(world, small, [1, 1])
    assert hot.place(small, small_segments, 2) is not None
    assert hot.place(small, small_segments, 2049) is None  # too many tokens


def test_no_hot_cache_when_off() -> None:
    world = World()
    backend = make_lora_backend("torch", CPU, MAX_RANK)
    assert make_hot_cache(_Linears(world), world.pool.layout, backend, 0) is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- through the runner

ROWS: list[tuple[list[int], str | None]] = [
    (list(range(20, 60)), "all_r8_rslora"),
    ([5, 6, 7, 8, 9, 10, 11], None),
    (list(range(100, 123)), "qv_r4"),
    ([17, 3, 99], "mlp_r16_patterns"),
]
MIXED = ("qv_r4", "all_r8_rslora", "mlp_r16_patterns")


def make_runner(base_dir: Path, hot_rows: int | None) -> ModelRunner:
    return ModelRunner(
        model_path=str(base_dir), device="cpu", page_size=4, num_kv_pages=256, enable_lora=True,
        lora_max_rank=16, lora_target_modules=("all",), lora_backend="torch",
        lora_hot_rows=hot_rows,
    )  # fmt: skip


def hot_of(driver: PlanDriver) -> HotCache:
    lora = driver.runner.lora
    assert lora is not None
    assert lora.hot is not None
    return lora.hot


@pytest.mark.parametrize("hot_rows", [None, 16])  # the rule's 128: all fit; 16: one at a time
def test_hot_path_matches_peft(
    checkpoint_dir: Callable[[str], Path], adapter_dir: Callable[[str], Path], hot_rows: int | None
) -> None:
    base_dir = checkpoint_dir("llama")
    driver = PlanDriver(make_runner(base_dir, hot_rows), token_budget=16, lora_rows=48)
    load = driver.runner.make_adapter_loader()
    ids = {name: 100 + i for i, name in enumerate(MIXED)}
    for name in MIXED:
        driver.add_adapter(ids[name], load(str(adapter_dir(name))))
    ours = driver.generate([p for p, _ in ROWS], [ids[a] if a else None for _, a in ROWS], 12)
    expected, _ = peft_greedy(base_dir, {a: adapter_dir(a) for a in MIXED}, ROWS, 12)
    assert ours == expected
    hot = hot_of(driver)
    assert hot.num_rows == (hot_rows or 128)
    if hot_rows is None:
        assert hot.num_steps > 0
        assert hot.num_fills == 3  # each adapter copied in once
    else:  # decode steps (28 rows > 16) and prefill steps (never hot) took the rows
        assert hot.num_steps == 0


def test_rows_reused_and_rewritten(
    checkpoint_dir: Callable[[str], Path], adapter_dir: Callable[[str], Path]
) -> None:
    """X runs hot; X goes and Y is uploaded into X's rows and runs hot; Y moves to other rows;
    then Y's id gets other weights in the very same rows (only the upload says so): no step may
    read a stale hot row."""
    base_dir = checkpoint_dir("llama")
    driver = PlanDriver(make_runner(base_dir, None), token_budget=16, lora_rows=16)
    load = driver.runner.make_adapter_loader()
    rows: list[tuple[list[int], str | None]] = [(list(range(30, 45)), "x"), ([9, 8, 7], None)]
    prompts = [p for p, _ in rows]
    copies = {n: load(str(adapter_dir(n))) for n in ("all_r16", "qv_r4", "all_r8_rslora")}
    expected = {n: peft_greedy(base_dir, {"x": adapter_dir(n)}, rows, 10)[0] for n in copies}
    x_rows = list(driver.add_adapter(0, copies["all_r16"]))
    assert driver.generate(prompts, [0, None], 10) == expected["all_r16"]
    driver.remove_adapter(0)
    driver.add_adapter(1, copies["qv_r4"], rows=x_rows[:4])
    assert driver.generate(prompts, [1, None], 10) == expected["qv_r4"]
    driver.add_adapter(1, copies["all_r8_rslora"], rows=x_rows[4:12])
    assert driver.generate(prompts, [1, None], 10) == expected["all_r8_rslora"]
    driver.add_adapter(1, copies["qv_r4"], rows=x_rows[4:12], rank=8)  # same rows, new weights
    assert driver.generate(prompts, [1, None], 10) == expected["qv_r4"]
    hot = hot_of(driver)
    assert hot.num_fills == 4
    assert hot.num_steps >= 4 * 8  # the decode steps (a chunked prefill's second chunk is mixed)
