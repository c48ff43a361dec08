"""Random sequences of load, finish/fail, unload, acquire and release through the registry.

After every call the registry's invariants hold and its effects are consistent with a model of the
peers: the runner's host copies (every held adapter has one; HostCopyReady comes before the grant
that lets a plan upload it), the scheduler's references and retirements, and open admin ops. At
the end, once everything is released and unloaded, every reference was released exactly once,
every host copy dropped and every version that served retired.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lorasrv.config import AdapterConfig
from lorasrv.engine.adapter_registry import AdapterRegistry, Effect, StartHostLoad
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

NAMES = st.sampled_from(["a", "b", "c", "d"])


class RegistryMachine(RuleBasedStateMachine):
    reg: AdapterRegistry

    @initialize(capacity=st.integers(1, 4), host_cap=st.one_of(st.none(), st.integers(1, 4)))
    def setup(self, capacity: int, host_cap: int | None) -> None:
        self.reg = AdapterRegistry(AdapterConfig(max_loaded_loras=host_cap), capacity=capacity)
        self.pending: list[AdapterId] = []  # host loads started, not yet reported
        self.held: dict[RequestId, AdapterId] = {}
        self.waiting: set[RequestId] = set()
        self.granted: Counter[RequestId] = Counter()
        self.released: Counter[RequestId] = Counter()
        self.open_ops: set[OpId] = set()
        self.runner_copies: set[AdapterId] = set()  # what the runner's host copies are
        self.served: set[AdapterId] = set()  # granted at least once: the scheduler knows them
        self.retired: set[AdapterId] = set()
        self.counter = 0

    def _next(self) -> int:
        self.counter += 1
        return self.counter

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case StartHostLoad():
                    assert effect.adapter_id not in self.pending
                    self.pending.append(effect.adapter_id)
                case HostCopyReady():
                    assert effect.adapter_id not in self.runner_copies
                    self.runner_copies.add(effect.adapter_id)
                case HostCopyDropped():
                    assert effect.adapter_id not in self.held.values(), "dropped while held"
                    self.runner_copies.remove(effect.adapter_id)
                case AdapterAcquired():
                    # NOTE: the upload source must already be at the runner.
                    assert effect.adapter_id in self.runner_copies, "granted before its copy"
                    self.waiting.remove(effect.request_id)
                    self.held[effect.request_id] = effect.adapter_id
                    self.granted[effect.request_id] += 1
                    self.served.add(effect.adapter_id)
                case AdapterAcquireFailed():
                    self.waiting.remove(effect.request_id)
                case AdapterRetired():
                    assert effect.adapter_id not in self.held.values(), "retired while held"
                    assert effect.adapter_id not in self.retired, "retired twice"
                    self.retired.add(effect.adapter_id)
                case AdapterOpDone():
                    self.open_ops.remove(effect.op_id)

    def _name(self, index: int, registered: bool) -> str:
        """Mostly a registered name, so that acquires and unloads do something."""
        by_name = self.reg.catalog.by_name
        names = sorted(by_name) if registered and by_name else ["a", "b", "c", "d"]
        return names[index % len(names)]

    @rule(name=NAMES, pin=st.integers(0, 3))
    def load(self, name: str, pin: int) -> None:
        op_id = OpId(self._next())
        self.open_ops.add(op_id)
        self._apply(self.reg.begin_load(op_id, name, f"/{name}", pin == 0))

    @rule(name=NAMES, pin=st.integers(0, 3))
    def load_now(self, name: str, pin: int) -> None:
        """A load whose host copy arrives at once: reaches crowded states sooner."""
        self.load(name, pin)
        if self.pending and self.reg.catalog.versions[self.pending[-1]].name == name:
            self._finish(self.pending.pop())

    def _finish(self, adapter_id: AdapterId) -> None:
        copy = HostCopy(weights=adapter_id, rank=4, scaling=1.0, load_s=0.0)
        self._apply(self.reg.finish_load(adapter_id, copy))

    @precondition(lambda self: self.pending)
    @rule(index=st.integers(0, 7), fail=st.integers(0, 3))
    def finish_load(self, index: int, fail: int) -> None:
        adapter_id = self.pending.pop(index % len(self.pending))
        if fail:
            self._finish(adapter_id)
        else:
            self._apply(self.reg.fail_load(adapter_id, "boom"))

    @rule(index=st.integers(0, 7), registered=st.booleans())
    def unload(self, index: int, registered: bool) -> None:
        self._unload(self._name(index, registered))

    def _unload(self, name: str) -> None:
        op_id = OpId(self._next())
        self.open_ops.add(op_id)
        self._apply(self.reg.unload(op_id, name))

    @rule(index=st.integers(0, 7), registered=st.integers(0, 3))
    def acquire(self, index: int, registered: int) -> None:
        request_id = RequestId(f"r{self._next()}")
        self.waiting.add(request_id)
        self._apply(self.reg.acquire(request_id, self._name(index, registered > 0)))
        event(f"acquire: {len(self.waiting)} waiting, {len(self.pending)} loads in flight")

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 7))
    def release(self, index: int) -> None:
        request_id = sorted(self.held)[index % len(self.held)]
        self.released[request_id] += 1
        self._apply(self.reg.release(request_id, self.held.pop(request_id)))

    @invariant()
    def invariants_hold(self) -> None:
        self.reg.check_invariants()
        for adapter_id in self.held.values():
            assert adapter_id in self.runner_copies, "a held adapter lost its host copy"

    def teardown(self) -> None:
        if not hasattr(self, "reg"):
            return
        self._drain()
        assert not self.waiting, "an acquire still waits although nothing holds anything"
        for name in list(self.reg.catalog.by_name):
            self._unload(name)
        self._drain()
        self.reg.check_invariants()
        assert self.reg.catalog.versions == {}
        assert self.reg.host.entries == {}
        assert self.runner_copies == set(), "a host copy was never dropped"
        assert self.served <= self.retired, "a version that served was never retired"
        assert not self.waiting
        assert not self.open_ops, "an admin op never got its answer"
        assert set(self.released) == set(self.granted)
        assert all(n == 1 for n in (*self.granted.values(), *self.released.values()))

    def _drain(self) -> None:
        """Release every reference and finish every load until nothing is left in flight."""
        for _ in range(50):
            if not (self.held or self.pending):
                return
            for _ in range(len(self.held)):
                self.release(0)
            while self.pending:
                self._finish(self.pending.pop(0))
                self.reg.check_invariants()
        raise AssertionError("the registry never drained")


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
