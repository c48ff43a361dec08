"""The adapter state machine (every (state, next) pair) and the registry's rules, as plain calls."""

from __future__ import annotations

import itertools
from typing import Any, Literal

import pytest

from lorasrv.config import AdapterConfig
from lorasrv.engine.adapter_registry import AdapterRegistry
from lorasrv.engine.adapter_state import (
    NEXT,
    AdapterEntry,
    AdapterState,
    Effect,
    IllegalTransition,
    StartHostLoad,
    check_compatible,
)
from lorasrv.errors import status_for_code
from lorasrv.ids import AdapterId, OpId, RequestId, SlotId, StepId
from lorasrv.messages import (
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterOpDone,
    ClearSlot,
    LoadSlot,
    SlotAssignment,
    StepAdaptersReady,
)

S = AdapterState
ALLOWED = {(a, b) for a, nexts in NEXT.items() for b in nexts}


def test_every_state_has_a_row() -> None:
    assert set(NEXT) == set(AdapterState)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(AdapterState, AdapterState)))
def test_transition(old: AdapterState, new: AdapterState) -> None:
    entry = AdapterEntry(name="a", path="/a", adapter_id=AdapterId(1), pinned=False, state=old)
    if (old, new) in ALLOWED:
        entry.move_to(new)
        assert entry.state is new
    else:
        with pytest.raises(IllegalTransition, match=f"{old.name} -> {new.name}"):
            entry.move_to(new)
        assert entry.state is old


def test_check_compatible_names_the_flags() -> None:
    check_compatible(8, ("q_proj",), max_rank=8, target_modules=("q_proj", "v_proj"))
    with pytest.raises(
        ValueError, match=r"LoRA rank 16 is greater than max_lora_rank 8 \(raise --max-lora-rank\)"
    ):
        check_compatible(16, ("q_proj",), max_rank=8, target_modules=("q_proj",))
    with pytest.raises(ValueError, match=r"down_proj are outside --lora-target-modules"):
        check_compatible(8, ("q_proj", "down_proj"), max_rank=8, target_modules=("q_proj",))


# ----------------------------------------------------------------------------- registry


class Checked(AdapterRegistry):
    """Checks every invariant after every operation."""

    def begin_load(self, *args: Any) -> list[Effect]:
        return self._checked(super().begin_load(*args))

    def finish_load(self, *args: Any) -> list[Effect]:
        return self._checked(super().finish_load(*args))

    def fail_load(self, *args: Any) -> list[Effect]:
        return self._checked(super().fail_load(*args))

    def unload(self, *args: Any) -> list[Effect]:
        return self._checked(super().unload(*args))

    def acquire(self, *args: Any) -> list[Effect]:
        return self._checked(super().acquire(*args))

    def release(self, *args: Any) -> list[Effect]:
        return self._checked(super().release(*args))

    def prepare_step(self, *args: Any) -> list[Effect]:
        return self._checked(super().prepare_step(*args))

    def _checked(self, effects: list[Effect]) -> list[Effect]:
        self.check_invariants()
        return effects


def make(
    num_slots: int = 2,
    per_batch: int = 3,
    cap: int | None = None,
    policy: Literal["lru", "fifo"] = "lru",
) -> Checked:
    cfg = AdapterConfig(
        max_loras_per_batch=per_batch, max_loaded_loras=cap, lora_eviction_policy=policy
    )
    return Checked(cfg, num_slots)


def load(
    reg: Checked, name: str, pinned: bool = False, rank: int = 8
) -> tuple[AdapterId, list[Effect]]:
    (start,) = reg.begin_load(OpId(0), name, f"/adapters/{name}", pinned)
    assert isinstance(start, StartHostLoad)
    effects = reg.finish_load(start.adapter_id, f"weights-{name}", rank, 0.01)
    assert (
        AdapterOpDone(op_id=OpId(0), success=True, loaded_adapters=reg.loaded_adapters()) in effects
    )
    return start.adapter_id, effects


def step(reg: Checked, *ids: AdapterId) -> tuple[list[Effect], StepAdaptersReady]:
    effects = reg.prepare_step(StepId(1), ids)
    ready = effects[-1]
    assert isinstance(ready, StepAdaptersReady)
    return effects[:-1], ready


def acquire(reg: Checked, request: str, name: str) -> list[Effect]:
    return reg.acquire(RequestId(request), name)


def test_load_reports_every_registered_adapter_and_fresh_ids() -> None:
    reg = make()
    a, _ = load(reg, "a")
    b, effects = load(reg, "b")
    assert b > a
    assert effects[-1] == AdapterOpDone(
        op_id=OpId(0), success=True, loaded_adapters={"a": "/adapters/a", "b": "/adapters/b"}
    )
    assert reg.entries[a].state is S.CPU_LOADED


def test_same_name_twice_fails_and_a_failed_load_leaves_no_trace() -> None:
    reg = make()
    load(reg, "a")
    (done,) = reg.begin_load(OpId(7), "a", "/other", False)
    assert isinstance(done, AdapterOpDone)
    assert not done.success
    assert "already loaded; unload it first" in done.error_message
    (start,) = reg.begin_load(OpId(8), "b", "/bad", False)
    assert isinstance(start, StartHostLoad)
    (failed,) = reg.fail_load(start.adapter_id, "no adapter_config.json")
    assert isinstance(failed, AdapterOpDone)
    assert not failed.success
    assert failed.error_message == "failed to load adapter 'b' from '/bad': no adapter_config.json"
    assert [e.name for e in reg.entries.values()] == ["a"]
    b, _ = load(reg, "b")
    assert b > start.adapter_id


def test_acquire_unknown_is_not_found_and_still_loading_waits() -> None:
    reg = make()
    (start,) = reg.begin_load(OpId(1), "a", "/a", False)
    (failed,) = acquire(reg, "r1", "nope")
    assert isinstance(failed, AdapterAcquireFailed)
    assert failed.code == "adapter_not_found"
    assert acquire(reg, "r2", "a") == []  # waits for the first load, no 404 for a loading name
    effects = reg.finish_load(start.adapter_id, "w", 8, 0.1)
    granted = [e for e in effects if isinstance(e, AdapterAcquired)]
    assert [g.request_id for g in granted] == ["r2"]
    reg.check_invariants()


def test_acquire_and_release_exactly_once() -> None:
    reg = make()
    a, _ = load(reg, "a")
    assert acquire(reg, "r1", "a") == [
        AdapterAcquired(request_id=RequestId("r1"), adapter_id=a, pinned=False, num_pinned=0)
    ]
    with pytest.raises(AssertionError, match="acquired twice"):
        reg.acquire(RequestId("r1"), "a")
    assert reg.release(RequestId("r1"), a) == []
    with pytest.raises(AssertionError, match="released twice"):
        reg.release(RequestId("r1"), a)
    with pytest.raises(AssertionError, match="unknown adapter id"):
        reg.release(RequestId("r2"), AdapterId(99))


def test_step_places_uploads_before_the_reply_and_defers_what_does_not_fit() -> None:
    reg = make(num_slots=2)
    a, b, c = (load(reg, n)[0] for n in "abc")
    uploads, ready = step(reg, a, b, c)
    assert uploads == [
        LoadSlot(slot_id=SlotId(0), adapter_id=a, weights="weights-a"),
        LoadSlot(slot_id=SlotId(1), adapter_id=b, weights="weights-b"),
    ]
    assert ready.slots == (SlotAssignment(a, SlotId(0)), SlotAssignment(b, SlotId(1)))
    assert ready.deferred == (c,)  # both slots belong to this step: nothing to evict
    uploads, ready = step(reg, a, b)
    assert uploads == []  # already resident
    assert reg.entries[c].state is S.CPU_LOADED


@pytest.mark.parametrize(("policy", "victim"), [("lru", "b"), ("fifo", "a")])
def test_lru_and_fifo_choose_different_victims(policy: Literal["lru", "fifo"], victim: str) -> None:
    reg = make(num_slots=2, policy=policy)
    ids = {n: load(reg, n)[0] for n in "abc"}
    step(reg, ids["a"])  # a enters first
    step(reg, ids["b"])
    step(reg, ids["a"])  # a used most recently
    uploads, ready = step(reg, ids["c"])
    evicted = reg.entries[ids[victim]]
    assert evicted.state is S.CPU_LOADED
    assert evicted.num_evictions == 1
    assert uploads == [
        LoadSlot(slot_id=SlotId(ready.slots[0].slot_id), adapter_id=ids["c"], weights="weights-c")
    ]
    assert ready.deferred == ()


def test_protected_set_and_pinned_are_never_evicted() -> None:
    reg = make(num_slots=3, per_batch=3)
    p, effects = load(reg, "p", pinned=True)
    assert effects[0] == LoadSlot(slot_id=SlotId(0), adapter_id=p, weights="weights-p")
    assert reg.entries[p].state is S.PINNED
    a, b, c = (load(reg, n)[0] for n in "abc")
    _, ready = step(reg, a, b)
    _, ready = step(reg, a, c)  # b is the only victim: a is protected, p pinned
    assert reg.entries[b].state is S.CPU_LOADED
    assert reg.entries[p].state is S.PINNED
    _, ready = step(reg, a, c, b)
    assert ready.deferred == (b,)
    assert ready.num_pinned == 1


def test_pinned_load_waits_for_a_slot_when_all_are_protected() -> None:
    reg = make(num_slots=2, per_batch=2)
    a, b = (load(reg, n)[0] for n in "ab")
    step(reg, a, b)
    p, effects = load(reg, "p", pinned=True)
    assert not any(isinstance(e, LoadSlot) for e in effects)
    assert reg.entries[p].state is S.CPU_LOADED
    assert reg.num_pinned() == 1
    uploads, ready = step(reg, a)  # the pending pin goes first, evicting b (not protected now)
    assert uploads == [LoadSlot(slot_id=SlotId(1), adapter_id=p, weights="weights-p")]
    assert reg.entries[p].state is S.PINNED
    assert reg.entries[b].state is S.CPU_LOADED
    assert ready.num_pinned == 1


def test_pin_limit_names_the_flag() -> None:
    reg = make(num_slots=3, per_batch=3)
    load(reg, "p1", pinned=True)
    load(reg, "p2", pinned=True)
    (done,) = reg.begin_load(OpId(3), "p3", "/p3", True)
    assert isinstance(done, AdapterOpDone)
    assert not done.success
    assert "--max-loras-per-batch - 1 = 2" in done.error_message


def test_host_cap_drops_lru_and_reloads_on_demand() -> None:
    reg = make(num_slots=2, per_batch=2, cap=2)
    a, b = (load(reg, n)[0] for n in "ab")
    _, ready_a = step(reg, a)
    step(reg, b)
    c, effects = load(reg, "c")  # the cap drops a (least recently used), clearing its slot
    assert effects[0] == ClearSlot(slot_id=ready_a.slots[0].slot_id)
    assert reg.entries[a].state is S.UNLOADED
    assert reg.entries[a].weights is None
    assert reg.entries[a].num_evictions == 1
    assert "a" in reg.loaded_adapters()  # still registered
    (reload,) = acquire(reg, "r1", "a")  # drops c (b belongs to the latest step) and reloads
    assert reload == StartHostLoad(a, "/adapters/a")
    assert reg.entries[c].state is S.UNLOADED
    assert acquire(reg, "r2", "a") == []  # queued behind the same reload
    granted = reg.finish_load(a, "weights-a2", 8, 0.02)
    assert [g.request_id for g in granted if isinstance(g, AdapterAcquired)] == ["r1", "r2"]
    assert reg.entries[a].num_loads == 2
    assert reg.entries[a].adapter_id == a  # the same version keeps its id


def test_host_cap_spares_the_latest_step_when_it_can() -> None:
    reg = make(num_slots=2, per_batch=2, cap=2)
    a, b = (load(reg, n)[0] for n in "ab")
    step(reg, b)
    acquire(reg, "r0", "a")
    reg.release(RequestId("r0"), a)  # b is now least recently used, but protected
    load(reg, "c")
    assert reg.entries[a].state is S.UNLOADED
    assert reg.entries[b].state is S.GPU_RESIDENT


def test_failed_reload_fails_its_waiters_and_keeps_the_adapter() -> None:
    reg = make(num_slots=1, per_batch=1, cap=1)
    a, _ = load(reg, "a")
    load(reg, "b")  # drops a
    acquire(reg, "r1", "a")
    (failed,) = reg.fail_load(a, "disk gone")
    assert isinstance(failed, AdapterAcquireFailed)
    assert failed.code == "adapter_unavailable"  # 503: the next acquire retries the load
    assert status_for_code(failed.code) == 503
    assert reg.entries[a].state is S.UNLOADED


def test_host_cap_without_victim_makes_acquires_wait_for_a_release() -> None:
    reg = make(num_slots=1, per_batch=1, cap=1)
    a, _ = load(reg, "a")
    acquire(reg, "r1", "a")
    b, _ = load(reg, "b")  # a is referenced: b is registered but dropped
    assert reg.entries[b].state is S.UNLOADED
    assert acquire(reg, "r2", "b") == []  # waits: no victim
    assert reg.release(RequestId("r1"), a) == [StartHostLoad(b, "/adapters/b")]
    assert reg.entries[a].state is S.UNLOADED


def test_unload_waits_for_refs_and_a_new_version_coexists() -> None:
    reg = make(num_slots=2)
    old, _ = load(reg, "a")
    acquire(reg, "r1", "a")
    _, ready = step(reg, old)
    (done,) = reg.unload(OpId(5), "a")
    assert done == AdapterOpDone(op_id=OpId(5), success=True, loaded_adapters={})
    (failed,) = acquire(reg, "r2", "a")
    assert isinstance(failed, AdapterAcquireFailed)
    assert failed.code == "adapter_not_found"
    new, _ = load(reg, "a")  # same name while the old one drains
    assert new != old
    assert reg.entries[old].unloading
    assert reg.describe()[0].state == "unloading"
    assert reg.release(RequestId("r1"), old) == [ClearSlot(slot_id=ready.slots[0].slot_id)]
    assert list(reg.entries) == [new]


def test_unload_unknown_or_loading_fails() -> None:
    reg = make()
    (done,) = reg.unload(OpId(1), "x")
    assert isinstance(done, AdapterOpDone)
    assert done.error_message == "adapter 'x' is not loaded"
    reg.begin_load(OpId(2), "y", "/y", False)
    (done,) = reg.unload(OpId(3), "y")
    assert isinstance(done, AdapterOpDone)
    assert "still loading" in done.error_message


def test_unload_during_a_reload_fails_its_waiters_and_drops_the_result() -> None:
    reg = make(num_slots=1, per_batch=1, cap=1)
    a, _ = load(reg, "a")
    load(reg, "b")  # drops a
    assert acquire(reg, "r1", "a") == [StartHostLoad(a, "/adapters/a")]
    failed, done = reg.unload(OpId(4), "a")
    assert isinstance(failed, AdapterAcquireFailed)
    assert (failed.request_id, failed.code) == ("r1", "adapter_not_found")
    assert isinstance(done, AdapterOpDone)
    assert done.success
    assert reg.entries[a].state is S.LOADING  # the load in flight still reports back
    assert reg.finish_load(a, "weights-a", 8, 0.01) == []
    assert a not in reg.entries


def test_pinned_load_without_host_room_is_refused() -> None:
    reg = make(num_slots=2, per_batch=2, cap=2)
    load(reg, "a")
    load(reg, "b")
    acquire(reg, "r1", "a")
    acquire(reg, "r2", "b")  # every host copy is in use
    (start,) = reg.begin_load(OpId(9), "p", "/p", True)
    assert isinstance(start, StartHostLoad)
    acquire(reg, "r3", "p")  # a request waiting for the pinned adapter's load
    failed, done = reg.finish_load(start.adapter_id, "weights-p", 8, 0.01)
    assert isinstance(done, AdapterOpDone)
    assert not done.success
    assert "raise --max-loaded-loras" in done.error_message
    assert "p" not in reg.by_name
    assert isinstance(failed, AdapterAcquireFailed)
    assert (failed.request_id, failed.code) == ("r3", "adapter_not_found")  # 404, not 400


def test_a_reload_in_flight_holds_its_host_room() -> None:
    reg = make(num_slots=2, per_batch=2, cap=2)
    a, _ = load(reg, "a")
    load(reg, "b")
    c, _ = load(reg, "c")  # drops a
    assert acquire(reg, "r1", "a") == [StartHostLoad(a, "/adapters/a")]  # drops b
    load(reg, "d")  # the reload of a counts: c must go, not the cap be exceeded
    assert reg.entries[c].state is S.UNLOADED
    reg.finish_load(a, "weights-a", 8, 0.01)  # the invariants check: host copies <= 2
    assert {e.name for e in reg.entries.values() if e.weights is not None} == {"a", "d"}
