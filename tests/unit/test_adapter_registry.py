"""The adapter manager's pure side: the catalog's phases and the host cache's states (every
(state, next) pair), and the registry's rules over both, as plain calls with the invariants
checked after every one."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from lorasrv.config import AdapterConfig
from lorasrv.engine import adapter_catalog, host_cache
from lorasrv.engine.adapter_catalog import AdapterVersion, IllegalTransition, Phase
from lorasrv.engine.adapter_registry import AdapterRegistry, Effect, StartHostLoad
from lorasrv.engine.host_cache import HostCache, HostState
from lorasrv.engine.lora_spec import check_compatible
from lorasrv.errors import status_for_code
from lorasrv.ids import AdapterId, OpId, RequestId
from lorasrv.messages import (
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterOpDone,
    AdapterRetired,
    HostCopy,
    HostCopyDropped,
    HostCopyReady,
)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(Phase, Phase)))
def test_phase_transition(old: Phase, new: Phase) -> None:
    version = AdapterVersion("a", "/a", AdapterId(1), pinned=False, phase=old)
    if new in adapter_catalog.NEXT[old]:
        version.move_to(new)
        assert version.phase is new
    else:
        with pytest.raises(IllegalTransition, match=f"{old.name} -> {new.name}"):
            version.move_to(new)
        assert version.phase is old


def test_host_states_only_go_from_loading_to_loaded() -> None:
    assert set(host_cache.NEXT) == set(HostState)
    cache = HostCache(max_loaded=1)
    cache.start_load(AdapterId(1), is_reload=True)
    assert cache.num_held() == 1  # a reload holds its room while it loads
    assert not cache.has_room()
    cache.loaded(AdapterId(1))
    with pytest.raises(AssertionError, match="loaded"):
        cache.loaded(AdapterId(1))
    with pytest.raises(AssertionError, match="loads twice"):
        cache.start_load(AdapterId(1), is_reload=False)
    cache.drop(AdapterId(1))
    assert cache.has_room()


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

    def _checked(self, effects: list[Effect]) -> list[Effect]:
        self.check_invariants()
        return effects


def make(capacity: int = 3, cap: int | None = None, per_batch: int | None = None) -> Checked:
    cfg = AdapterConfig(max_loras_per_batch=per_batch, max_loaded_loras=cap)
    return Checked(cfg, capacity=capacity)


def copy(name: str, rank: int = 8) -> HostCopy:
    return HostCopy(weights=f"weights-{name}", rank=rank, scaling=2.0, load_s=0.01)


def load(
    reg: Checked, name: str, pinned: bool = False, rank: int = 8
) -> tuple[AdapterId, list[Effect]]:
    (start,) = reg.begin_load(OpId(0), name, f"/adapters/{name}", pinned)
    assert isinstance(start, StartHostLoad)
    effects = reg.finish_load(start.adapter_id, copy(name, rank))
    assert (
        AdapterOpDone(op_id=OpId(0), success=True, loaded_adapters=reg.loaded_adapters()) in effects
    )
    return start.adapter_id, effects


def acquire(reg: Checked, request: str, name: str) -> list[Effect]:
    return reg.acquire(RequestId(request), name)


def ready(adapter_id: AdapterId, name: str, rank: int = 8) -> HostCopyReady:
    return HostCopyReady(adapter_id=adapter_id, weights=f"weights-{name}", rank=rank, scaling=2.0)


def test_load_sends_the_host_copy_and_reports_fresh_ids() -> None:
    reg = make()
    a, effects = load(reg, "a")
    assert effects[0] == ready(a, "a")
    b, effects = load(reg, "b", rank=16)
    assert b > a
    assert effects[0] == ready(b, "b", rank=16)
    assert effects[-1] == AdapterOpDone(
        op_id=OpId(0), success=True, loaded_adapters={"a": "/adapters/a", "b": "/adapters/b"}
    )
    status = reg.describe()[1]
    assert (status.phase, status.host, status.rank, status.gpu_rows) == ("ready", "loaded", 16, 0)


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
    assert [v.name for v in reg.catalog.versions.values()] == ["a"]
    assert reg.host.state(start.adapter_id) is None
    b, _ = load(reg, "b")
    assert b > start.adapter_id


def test_acquire_unknown_is_not_found_and_still_loading_waits() -> None:
    reg = make()
    (start,) = reg.begin_load(OpId(1), "a", "/a", False)
    (failed,) = acquire(reg, "r1", "nope")
    assert isinstance(failed, AdapterAcquireFailed)
    assert failed.code == "adapter_not_found"
    assert acquire(reg, "r2", "a") == []  # waits for the first load, no 404 for a loading name
    effects = reg.finish_load(start.adapter_id, copy("a", 4))
    # the host copy goes to the runner before the grant that lets a plan upload it
    assert isinstance(effects[0], HostCopyReady)
    granted = [e for e in effects if isinstance(e, AdapterAcquired)]
    assert granted == [
        AdapterAcquired(request_id=RequestId("r2"), adapter_id=start.adapter_id, rank=4)
    ]


def test_acquire_and_release_exactly_once() -> None:
    reg = make()
    a, _ = load(reg, "a")
    assert acquire(reg, "r1", "a") == [
        AdapterAcquired(request_id=RequestId("r1"), adapter_id=a, rank=8, pinned=False)
    ]
    with pytest.raises(AssertionError, match="acquired twice"):
        reg.acquire(RequestId("r1"), "a")
    assert reg.release(RequestId("r1"), a) == []
    with pytest.raises(AssertionError, match="released twice"):
        reg.release(RequestId("r1"), a)
    with pytest.raises(AssertionError, match="unknown adapter id"):
        reg.release(RequestId("r2"), AdapterId(99))


def test_pin_limit_is_the_effective_capacity_minus_one() -> None:
    reg = make(capacity=3, per_batch=3)
    load(reg, "p1", pinned=True)
    load(reg, "p2", pinned=True)
    (done,) = reg.begin_load(OpId(3), "p3", "/p3", True)
    assert isinstance(done, AdapterOpDone)
    assert not done.success
    assert "--max-loras-per-batch - 1 = 2" in done.error_message
    memory = make(capacity=2, per_batch=None)  # no cap: what memory holds at max rank
    load(memory, "p1", pinned=True)
    (done,) = memory.begin_load(OpId(3), "p2", "/p2", True)
    assert isinstance(done, AdapterOpDone)
    assert "the adapters a batch holds at --max-lora-rank - 1 = 1" in done.error_message
    assert memory.catalog.num_pinned() == 1
    host = make(capacity=8, cap=2)  # pinned copies stay in host memory too
    load(host, "p1", pinned=True)
    (done,) = host.begin_load(OpId(3), "p2", "/p2", True)
    assert isinstance(done, AdapterOpDone)
    assert "--max-loaded-loras - 1 = 1" in done.error_message


def test_host_cap_drops_lru_and_reloads_on_demand() -> None:
    reg = make(cap=2)
    a, b = (load(reg, n)[0] for n in "ab")
    acquire(reg, "r0", "b")
    reg.release(RequestId("r0"), b)  # a is now least recently used
    c, effects = load(reg, "c")
    assert effects[0] == HostCopyDropped(adapter_id=a)
    assert effects[1] == ready(c, "c")
    assert reg.host.state(a) is None
    assert reg.describe()[0].num_host_drops == 1
    assert "a" in reg.loaded_adapters()  # still registered
    drop_b, reload = acquire(reg, "r1", "a")  # drops b, the least recently used, and reloads
    assert drop_b == HostCopyDropped(adapter_id=b)
    assert reload == StartHostLoad(a, "/adapters/a")
    assert acquire(reg, "r2", "a") == []  # queued behind the same reload
    effects = reg.finish_load(a, copy("a"))
    assert effects[0] == ready(a, "a")
    assert [g.request_id for g in effects if isinstance(g, AdapterAcquired)] == ["r1", "r2"]
    assert reg.catalog.versions[a].num_loads == 2  # the same version keeps its id


def test_a_reload_whose_rank_changed_on_disk_fails() -> None:
    reg = make(cap=1)
    a, _ = load(reg, "a")
    load(reg, "b")  # drops a
    acquire(reg, "r1", "a")
    (failed,) = reg.finish_load(a, copy("a", rank=16))
    assert isinstance(failed, AdapterAcquireFailed)
    assert "rank changed on disk (8 -> 16)" in failed.detail
    assert reg.catalog.versions[a].phase is Phase.READY


def test_failed_reload_fails_its_waiters_and_keeps_the_adapter() -> None:
    reg = make(cap=1)
    a, _ = load(reg, "a")
    load(reg, "b")  # drops a
    acquire(reg, "r1", "a")
    (failed,) = reg.fail_load(a, "disk gone")
    assert isinstance(failed, AdapterAcquireFailed)
    assert failed.code == "adapter_unavailable"  # 503: the next acquire retries the load
    assert status_for_code(failed.code) == 503
    assert reg.catalog.versions[a].phase is Phase.READY
    assert reg.host.state(a) is None


def test_host_cap_without_victim_makes_acquires_wait_for_a_release() -> None:
    reg = make(cap=1)
    a, _ = load(reg, "a")
    acquire(reg, "r1", "a")
    b, effects = load(reg, "b")  # a is held: b is registered but its copy is not kept
    assert not any(isinstance(e, HostCopyReady) for e in effects)
    assert reg.describe()[1].host == "absent"
    assert acquire(reg, "r2", "b") == []  # waits: no victim
    assert reg.release(RequestId("r1"), a) == [
        HostCopyDropped(adapter_id=a),
        StartHostLoad(b, "/adapters/b"),
    ]


def test_unload_waits_for_refs_then_retires_and_a_new_version_coexists() -> None:
    reg = make()
    old, _ = load(reg, "a")
    acquire(reg, "r1", "a")
    (done,) = reg.unload(OpId(5), "a")
    assert done == AdapterOpDone(op_id=OpId(5), success=True, loaded_adapters={})
    (failed,) = acquire(reg, "r2", "a")
    assert isinstance(failed, AdapterAcquireFailed)
    assert failed.code == "adapter_not_found"
    new, _ = load(reg, "a")  # same name while the old one drains
    assert new != old
    assert reg.describe()[0].phase == "unloading"
    assert reg.release(RequestId("r1"), old) == [
        HostCopyDropped(adapter_id=old),
        AdapterRetired(adapter_id=old),
    ]
    assert list(reg.catalog.versions) == [new]


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
    reg = make(cap=1)
    a, _ = load(reg, "a")
    load(reg, "b")  # drops a
    assert acquire(reg, "r1", "a") == [HostCopyDropped(adapter_id=AdapterId(2)),
                                       StartHostLoad(a, "/adapters/a")]  # fmt: skip
    failed, done = reg.unload(OpId(4), "a")
    assert isinstance(failed, AdapterAcquireFailed)
    assert (failed.request_id, failed.code) == ("r1", "adapter_not_found")
    assert isinstance(done, AdapterOpDone)
    assert done.success
    assert reg.host.state(a) is HostState.LOADING  # the load in flight still reports back
    assert reg.finish_load(a, copy("a")) == [AdapterRetired(adapter_id=a)]
    assert a not in reg.catalog.versions


def test_pinned_load_without_host_room_is_refused() -> None:
    reg = make(cap=2)
    load(reg, "a")
    load(reg, "b")
    acquire(reg, "r1", "a")
    acquire(reg, "r2", "b")  # every host copy is in use
    (start,) = reg.begin_load(OpId(9), "p", "/p", True)
    assert isinstance(start, StartHostLoad)
    acquire(reg, "r3", "p")  # a request waiting for the pinned adapter's load
    failed, *_, done = reg.finish_load(start.adapter_id, copy("p"))
    assert isinstance(done, AdapterOpDone)
    assert not done.success
    assert "raise --max-loaded-loras" in done.error_message
    assert "p" not in reg.catalog.by_name
    assert isinstance(failed, AdapterAcquireFailed)
    assert (failed.request_id, failed.code) == ("r3", "adapter_not_found")  # 404, not 400


def test_pinned_copies_are_never_dropped_by_the_host_cap() -> None:
    reg = make(cap=2)
    p, _ = load(reg, "p", pinned=True)
    load(reg, "a")
    load(reg, "b")  # drops a, not the older pinned p
    assert reg.host.state(p) is HostState.LOADED
    assert reg.describe()[1].host == "absent"


def test_a_reload_in_flight_holds_its_host_room() -> None:
    reg = make(cap=2)
    a, _ = load(reg, "a")
    load(reg, "b")
    c, _ = load(reg, "c")  # drops a
    acquire(reg, "r1", "a")  # drops b, reloads a
    _, effects = load(reg, "d")  # the reload of a counts: c must go, not the cap be exceeded
    assert effects[0] == HostCopyDropped(adapter_id=c)
    reg.finish_load(a, copy("a"))  # the invariants check: host copies <= 2
    loaded = {v.name for v in reg.catalog.versions.values()
              if reg.host.state(v.adapter_id) is HostState.LOADED}  # fmt: skip
    assert loaded == {"a", "d"}
