"""AdapterManagerActor driven through its inbox, with fake peers that record what they receive."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import pytest

from lorasrv.config import AdapterConfig
from lorasrv.engine.adapter_manager import AdapterManagerActor
from lorasrv.errors import status_for_code
from lorasrv.ids import AdapterId, OpId, RequestId, SlotId, StepId
from lorasrv.messages import (
    AcquireAdapter,
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterOpDone,
    AdapterStatus,
    ClearSlot,
    DescribeAdapters,
    LoadAdapter,
    LoadSlot,
    PrepareStep,
    ReleaseAdapter,
    SlotAssignment,
    StepAdaptersReady,
    UnloadAdapter,
)


class FakePeft(NamedTuple):
    path: str
    max_rank: int
    target_modules: tuple[str, ...]


class FakeDisk:
    """Adapter folders by path; a gated path blocks its load until the test opens the gate."""

    def __init__(self) -> None:
        self.folders = {
            f"/{name}": FakePeft(f"/resolved/{name}", 8, ("q_proj", "v_proj"))
            for name in ("a", "b", "c", "p1", "p2", "slow")
        }
        self.folders["/big"] = FakePeft("/resolved/big", 64, ("q_proj",))
        self.folders["/mlp"] = FakePeft("/resolved/mlp", 8, ("q_proj", "down_proj"))
        self.weight_errors: dict[str, Exception] = {}
        self.gates: dict[str, threading.Event] = {}
        self.num_reads: Counter[str] = Counter()

    def read_config(self, path: str) -> FakePeft:
        self.num_reads[path] += 1
        if path not in self.folders:
            raise ValueError(f"{path}: no adapter_config.json")
        return self.folders[path]

    def load_weights(self, path: str) -> object:
        gate = self.gates.get(path)
        if gate is not None:
            assert gate.wait(5), "gate never opened"
        if path in self.weight_errors:
            raise self.weight_errors[path]
        return f"weights:{path}"


class Harness:
    def __init__(self, cfg: AdapterConfig, num_slots: int) -> None:
        self.disk = FakeDisk()
        self.log: list[tuple[str, Any]] = []  # (peer, message) in the order sent
        self.actor = AdapterManagerActor(
            cfg=cfg,
            num_slots=num_slots,
            max_rank=16,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            read_config=self.disk.read_config,
            load_weights=self.disk.load_weights,
            scheduler=_Peer(self.log, "scheduler"),
            runner=_Peer(self.log, "runner"),
            ops=_Peer(self.log, "ops"),
        )
        self.task: asyncio.Task[None] | None = None
        self._next_op = 0

    def sent(self, peer: str) -> list[Any]:
        return [msg for who, msg in self.log if who == peer]

    async def until(self, find: Callable[[], Any]) -> Any:
        """Wait for `find()` to return something; surfaces a crashed actor at once."""
        async with asyncio.timeout(2):
            while (found := find()) is None:
                if self.task is not None and self.task.done():
                    self.task.result()
                await asyncio.sleep(0.001)
        return found

    def send_op(self, make: Callable[[OpId], Any]) -> OpId:
        self._next_op += 1
        self.actor.send(make(OpId(self._next_op)))
        return OpId(self._next_op)

    async def op_result(self, op_id: OpId) -> AdapterOpDone:
        return await self.until(
            lambda: next((m for m in self.sent("ops") if m.op_id == op_id), None)
        )

    async def load(self, name: str, path: str | None = None, pinned: bool = False) -> AdapterOpDone:
        return await self.op_result(
            self.send_op(
                lambda op: LoadAdapter(
                    op_id=op, lora_name=name, lora_path=path or f"/{name}", pinned=pinned
                )
            )
        )

    async def unload(self, name: str) -> AdapterOpDone:
        return await self.op_result(
            self.send_op(lambda op: UnloadAdapter(op_id=op, lora_name=name))
        )

    async def describe(self) -> tuple[AdapterStatus, ...]:
        """Also a barrier: every message sent before it has been handled."""
        return (await self.op_result(self.send_op(lambda op: DescribeAdapters(op_id=op)))).adapters

    async def acquire(self, request: str, name: str) -> AdapterAcquired | AdapterAcquireFailed:
        self.actor.send(AcquireAdapter(request_id=RequestId(request), lora_name=name))
        return await self.until(lambda: self._reply_to(request))

    def _reply_to(self, request: str) -> Any:
        replies = (AdapterAcquired, AdapterAcquireFailed)
        return next(
            (
                m
                for m in self.sent("scheduler")
                if isinstance(m, replies) and m.request_id == request
            ),
            None,
        )

    async def step(self, step: int, *ids: AdapterId) -> StepAdaptersReady:
        self.actor.send(PrepareStep(step_id=StepId(step), adapter_ids=ids))
        return await self.until(
            lambda: next(
                (
                    m
                    for m in self.sent("scheduler")
                    if isinstance(m, StepAdaptersReady) and m.step_id == step
                ),
                None,
            )
        )

    def release(self, request: str, adapter_id: AdapterId) -> None:
        self.actor.send(ReleaseAdapter(request_id=RequestId(request), adapter_id=adapter_id))


class _Peer:
    def __init__(self, log: list[tuple[str, Any]], name: str) -> None:
        self.log, self.name = log, name

    def send(self, msg: Any) -> None:
        self.log.append((self.name, msg))

    def op_done(self, result: AdapterOpDone) -> None:
        self.log.append((self.name, result))


@contextlib.asynccontextmanager
async def running(
    num_slots: int = 2, per_batch: int = 2, cap: int | None = None
) -> AsyncIterator[Harness]:
    cfg = AdapterConfig(max_loras_per_batch=per_batch, max_loaded_loras=cap)
    harness = Harness(cfg, num_slots)
    harness.task = asyncio.create_task(harness.actor.run())
    try:
        yield harness
    finally:
        for gate in harness.disk.gates.values():
            gate.set()
        harness.task.cancel()
        async with asyncio.timeout(2):
            with contextlib.suppress(asyncio.CancelledError):
                await harness.task


async def acquired(h: Harness, request: str, name: str) -> AdapterAcquired:
    reply = await h.acquire(request, name)
    assert isinstance(reply, AdapterAcquired), reply
    return reply


# ----------------------------------------------------------------------------- tests


async def test_load_succeeds_and_describe_reports_it() -> None:
    async with running() as h:
        done = await h.load("a")
        assert done.success
        assert done.loaded_adapters == {"a": "/a"}
        (status,) = await h.describe()
        assert (status.name, status.state, status.rank, status.num_loads) == (
            "a",
            "cpu_loaded",
            8,
            1,
        )
        assert status.last_load_s >= 0.0


async def test_second_load_of_a_name_fails() -> None:
    async with running() as h:
        assert (await h.load("a")).success
        done = await h.load("a", "/b")
        assert not done.success
        assert done.error_message == "adapter 'a' is already loaded; unload it first"
        assert done.loaded_adapters == {"a": "/a"}


@pytest.mark.parametrize(
    ("path", "weight_error", "message"),
    [
        ("/missing", None, "/missing: no adapter_config.json"),
        ("/big", None, "LoRA rank 64 is greater than max_lora_rank 16"),
        ("/mlp", None, "down_proj are outside --lora-target-modules"),
        ("/a", OSError("adapter_model.safetensors: truncated"), "truncated"),
        ("/a", RuntimeError("loader bug"), "RuntimeError: loader bug"),
    ],
)
async def test_failed_load_leaves_no_trace(
    path: str, weight_error: Exception | None, message: str
) -> None:
    async with running() as h:
        if weight_error is not None:
            h.disk.weight_errors["/resolved/a"] = weight_error
        done = await h.load("x", path)
        assert not done.success
        assert done.error_message.startswith(f"failed to load adapter 'x' from {path!r}: ")
        assert message in done.error_message
        assert await h.describe() == ()
        h.disk.weight_errors.clear()
        assert (await h.load("x", "/a")).success  # the name is free again


async def test_acquire_unknown_is_404_and_acquire_known_is_granted() -> None:
    async with running() as h:
        failed = await h.acquire("r1", "nope")
        assert isinstance(failed, AdapterAcquireFailed)
        assert failed.code == "adapter_not_found"
        assert status_for_code(failed.code) == 404
        await h.load("a")
        reply = await acquired(h, "r2", "a")
        assert (reply.pinned, reply.num_pinned) == (False, 0)
        assert (await h.describe())[0].num_refs == 1
        h.release("r2", reply.adapter_id)
        assert (await h.describe())[0].num_refs == 0


async def test_step_with_more_adapters_than_slots_evicts_and_defers() -> None:
    async with running(num_slots=2, per_batch=2) as h:
        for name in "abc":
            await h.load(name)
        a, b, c = [(await acquired(h, f"r{n}", n)).adapter_id for n in "abc"]
        first = await h.step(1, a, b)
        slot_of = {s.adapter_id: s.slot_id for s in first.slots}
        second = await h.step(2, a, c)  # b is not in this step: it is the victim
        assert second.slots == (SlotAssignment(a, slot_of[a]), SlotAssignment(c, slot_of[b]))
        upload = LoadSlot(slot_id=slot_of[b], adapter_id=c, weights="weights:/resolved/c")
        assert h.log.index(("runner", upload)) < h.log.index(("scheduler", second))
        third = await h.step(3, a, c, b)  # a and c are protected now: b waits
        assert third.deferred == (b,)
        statuses = {s.name: s for s in await h.describe()}
        assert statuses["b"].state == "cpu_loaded"
        assert statuses["b"].num_evictions == 1


async def test_unload_while_referenced_clears_the_slot_after_the_release() -> None:
    async with running() as h:
        await h.load("a")
        a = (await acquired(h, "r1", "a")).adapter_id
        (assignment,) = (await h.step(1, a)).slots
        done = await h.unload("a")  # answered at once, although r1 still holds it
        assert done.success
        assert done.loaded_adapters == {}
        failed = await h.acquire("r2", "a")
        assert isinstance(failed, AdapterAcquireFailed)
        assert failed.code == "adapter_not_found"
        (status,) = await h.describe()
        assert status.state == "unloading"
        assert not any(isinstance(m, ClearSlot) for m in h.sent("runner"))
        h.release("r1", a)
        assert await h.describe() == ()
        assert h.sent("runner")[-1] == ClearSlot(slot_id=assignment.slot_id)
        assert (await h.unload("a")).error_message == "adapter 'a' is not loaded"


async def test_reload_of_a_draining_name_gets_a_new_id() -> None:
    async with running() as h:
        await h.load("a")
        old = (await acquired(h, "r1", "a")).adapter_id
        await h.unload("a")
        assert (await h.load("a", "/b")).loaded_adapters == {"a": "/b"}
        new = (await acquired(h, "r2", "a")).adapter_id
        assert new > old
        assert [(s.adapter_id, s.state) for s in await h.describe()] == [
            (old, "unloading"),
            (new, "cpu_loaded"),
        ]
        h.release("r1", old)
        assert [s.adapter_id for s in await h.describe()] == [new]
        h.release("r2", new)
        assert (await h.describe())[0].num_refs == 0


async def test_host_cap_drops_an_adapter_and_reloads_it_on_demand() -> None:
    async with running(num_slots=1, per_batch=1, cap=1) as h:
        await h.load("a")
        assert (await h.load("b")).loaded_adapters == {"a": "/a", "b": "/b"}
        states = {s.name: s.state for s in await h.describe()}
        assert states == {"a": "unloaded", "b": "cpu_loaded"}
        reply = await acquired(h, "r1", "a")  # reloads a, dropping b
        statuses = {s.name: s for s in await h.describe()}
        assert (statuses["a"].state, statuses["a"].num_loads) == ("cpu_loaded", 2)
        assert statuses["b"].state == "unloaded"
        assert reply.adapter_id == statuses["a"].adapter_id
        assert h.disk.num_reads["/a"] == 2


async def test_failed_reload_fails_the_waiting_acquires() -> None:
    async with running(num_slots=1, per_batch=1, cap=1) as h:
        await h.load("a")
        await h.load("b")  # drops a from host
        del h.disk.folders["/a"]
        failed = await h.acquire("r1", "a")
        assert isinstance(failed, AdapterAcquireFailed)
        assert failed.code == "adapter_unavailable"
        assert "no adapter_config.json" in failed.detail


async def test_pinned_adapters_take_a_slot_at_once_up_to_the_limit() -> None:
    async with running(num_slots=2, per_batch=2) as h:
        assert (await h.load("p1", pinned=True)).success
        assert h.sent("runner") == [
            LoadSlot(slot_id=SlotId(0), adapter_id=AdapterId(1), weights="weights:/resolved/p1")
        ]
        done = await h.load("p2", pinned=True)
        assert not done.success
        assert "at most --max-loras-per-batch - 1 = 1" in done.error_message
        reply = await acquired(h, "r1", "p1")
        assert (reply.pinned, reply.num_pinned) == (True, 1)


async def test_a_slow_load_blocks_no_other_operation() -> None:
    async with running() as h:
        gate = h.disk.gates["/resolved/slow"] = threading.Event()
        slow_op = h.send_op(lambda op: LoadAdapter(op_id=op, lora_name="slow", lora_path="/slow"))
        assert (await h.load("a")).success
        a = (await acquired(h, "r1", "a")).adapter_id
        # A request for an adapter still loading waits for it (no 404 for a name being loaded).
        h.actor.send(AcquireAdapter(request_id=RequestId("r2"), lora_name="slow"))
        h.release("r1", a)
        assert (await h.unload("a")).success
        assert [(s.name, s.state) for s in await h.describe()] == [("slow", "loading")]
        assert h._reply_to("r2") is None
        gate.set()
        assert (await h.op_result(slow_op)).loaded_adapters == {"slow": "/slow"}
        waited = await h.until(lambda: h._reply_to("r2"))
        assert isinstance(waited, AdapterAcquired)


async def test_requests_waiting_on_a_failed_first_load_fail_with_its_reason() -> None:
    async with running() as h:
        gate = h.disk.gates["/resolved/slow"] = threading.Event()
        h.disk.weight_errors["/resolved/slow"] = ValueError("corrupt adapter_model.safetensors")
        slow_op = h.send_op(lambda op: LoadAdapter(op_id=op, lora_name="slow", lora_path="/slow"))
        h.actor.send(AcquireAdapter(request_id=RequestId("r1"), lora_name="slow"))

        def r1_waits() -> bool | None:
            entry = h.actor.registry.by_name.get("slow")
            return (entry is not None and RequestId("r1") in entry.waiters) or None

        await h.until(r1_waits)
        gate.set()
        assert not (await h.op_result(slow_op)).success
        failed = await h.until(lambda: h._reply_to("r1"))
        assert isinstance(failed, AdapterAcquireFailed)
        assert failed.code == "adapter_not_found"
        assert "corrupt adapter_model.safetensors" in failed.detail
