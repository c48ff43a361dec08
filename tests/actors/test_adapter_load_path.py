"""The adapter manager's load path at scale: rows from the host copy's own rank, a describe of one
name that costs O(1) whatever is registered, and the registry's tables kept in O(1) per change
(checked against the slow recount after every call)."""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import pytest

from lorasrv.config import AdapterConfig
from lorasrv.engine.adapter_manager import copy_rank
from lorasrv.engine.adapter_registry import AdapterRegistry, StartHostLoad
from lorasrv.ids import OpId, RequestId
from lorasrv.messages import AdapterAcquired, DescribeAdapters, HostCopy, HostCopyReady
from tests.actors.test_adapter_manager import FakeDisk, FakePeft, acquired, running


class Copy(NamedTuple):
    """A loader's host copy: what the engine reads of it."""

    rank: int
    scaling: float
    num_bytes: int = 0


def test_rows_come_from_the_copys_rank_not_the_configs() -> None:
    peft = FakePeft("/x", 16, ("q_proj",), 2.0)  # r=16 in the config
    assert copy_rank(Copy(rank=4, scaling=8.0), peft) == (4, 8.0)  # tensors of rank 4
    assert copy_rank("opaque", peft) == (16, 2.0)  # a loader that says nothing: the config's


async def test_a_narrow_adapter_gets_the_rows_its_tensors_need(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = FakeDisk.load_weights

    def load_weights(disk: FakeDisk, path: str) -> object:
        return Copy(rank=4, scaling=4.0) if path == "/resolved/narrow" else plain(disk, path)

    monkeypatch.setattr(FakeDisk, "load_weights", load_weights)
    async with running() as h:
        h.disk.folders["/narrow"] = FakePeft("/resolved/narrow", 16, ("q_proj",))
        assert (await h.load("n", "/narrow")).success
        granted = await acquired(h, "r1", "n")
        assert (granted.rank, granted.pinned) == (4, False)
        (copy,) = [m for m in h.sent("runner") if isinstance(m, HostCopyReady)]
        assert (copy.rank, copy.scaling) == (4, 4.0)


async def test_describe_one_name_returns_its_live_version_only() -> None:
    async with running() as h:
        for name in ("a", "b"):
            assert (await h.load(name)).success
        done = await h.op_result(h.send_op(lambda op: DescribeAdapters(op_id=op, names=("b",))))
        assert [s.name for s in done.adapters] == ["b"]
        assert done.loaded_adapters == {}  # the full list only for a full describe
        unknown = await h.op_result(
            h.send_op(lambda op: DescribeAdapters(op_id=op, names=("zzz",)))
        )
        assert unknown.adapters == ()
        assert {s.name for s in await h.describe()} == {"a", "b"}


def test_a_thousand_loads_acquires_and_releases_keep_the_fast_tables_exact() -> None:
    """Held count, LRU order and the loaded-adapter list are kept as they change; the
    registry's invariants recount them the slow way after every call."""
    registry = AdapterRegistry(AdapterConfig(max_loaded_loras=24), capacity=8)
    rng = random.Random(0)
    loads: list[Any] = []
    for i in range(1000):
        (start,) = registry.begin_load(OpId(i), f"m{i}", f"/m{i}", False)
        assert isinstance(start, StartHostLoad)
        loads.append(start)
        if rng.random() < 0.5:  # loads finish out of order
            done = loads.pop(rng.randrange(len(loads)))
            registry.finish_load(done.adapter_id, HostCopy(weights=0, rank=8, scaling=1.0,
                                                           load_s=0.0))  # fmt: skip
        registry.check_invariants()
    for start in loads:
        registry.finish_load(start.adapter_id, HostCopy(weights=0, rank=8, scaling=1.0, load_s=0))
    registry.check_invariants()
    assert len(registry.loaded_adapters()) == 1000
    held: list[tuple[RequestId, Any]] = []
    for i in range(600):
        if held and rng.random() < 0.5:
            request, adapter_id = held.pop(rng.randrange(len(held)))
            effects = registry.release(request, adapter_id)
        else:
            request = RequestId(f"r{i}")
            effects = registry.acquire(request, f"m{rng.randrange(1000)}")
        for effect in effects:
            if isinstance(effect, AdapterAcquired):
                held.append((effect.request_id, effect.adapter_id))
            elif isinstance(effect, StartHostLoad):  # a reload from disk
                effects_done = registry.finish_load(
                    effect.adapter_id, HostCopy(weights=0, rank=8, scaling=1.0, load_s=0)
                )
                held += [(e.request_id, e.adapter_id) for e in effects_done
                         if isinstance(e, AdapterAcquired)]  # fmt: skip
        registry.check_invariants()
    assert registry.host.num_held() <= 24
