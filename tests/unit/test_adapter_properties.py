"""Random sequences of load, finish/fail, unload, acquire, release and step through the registry.

After every call the registry's invariants hold and its effects are consistent with a model of the
peers (runner slots, held references, open admin ops). At the end, once everything is released and
unloaded, every reference was released exactly once and no slot is left behind.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lorasrv.config import AdapterConfig
from lorasrv.engine.adapter_registry import AdapterRegistry
from lorasrv.engine.adapter_state import Effect, StartHostLoad
from lorasrv.ids import AdapterId, OpId, RequestId, SlotId, StepId
from lorasrv.messages import (
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterOpDone,
    ClearSlot,
    LoadSlot,
    StepAdaptersReady,
)

NAMES = st.sampled_from(["a", "b", "c", "d"])


class RegistryMachine(RuleBasedStateMachine):
    reg: AdapterRegistry

    @initialize(
        per_batch=st.integers(1, 3),
        extra_slots=st.integers(0, 1),
        extra_host=st.one_of(st.none(), st.integers(0, 2)),
        policy=st.sampled_from(["lru", "fifo"]),
    )
    def setup(self, per_batch: int, extra_slots: int, extra_host: int | None, policy: str) -> None:
        cap = None if extra_host is None else per_batch + extra_host  # config: cap >= per batch
        cfg = AdapterConfig(
            max_loras_per_batch=per_batch,
            max_loaded_loras=cap,
            lora_eviction_policy="fifo" if policy == "fifo" else "lru",
        )
        self.reg = AdapterRegistry(cfg, per_batch + extra_slots)
        self.pending: list[AdapterId] = []  # host loads started, not yet reported
        self.held: dict[RequestId, AdapterId] = {}
        self.waiting: set[RequestId] = set()
        self.granted: Counter[RequestId] = Counter()
        self.released: Counter[RequestId] = Counter()
        self.open_ops: set[OpId] = set()
        self.runner_slots: dict[SlotId, AdapterId] = {}  # what the runner's pool holds
        self.latest: dict[SlotId, AdapterId] = {}  # the latest step's assignments
        self.counter = 0

    def _next(self) -> int:
        self.counter += 1
        return self.counter

    def _apply(self, effects: list[Effect], in_step: bool = False) -> None:
        for effect in effects:
            match effect:
                case StartHostLoad():
                    assert effect.adapter_id not in self.pending
                    self.pending.append(effect.adapter_id)
                case LoadSlot() | ClearSlot():
                    owner = self.latest.get(effect.slot_id)
                    if not in_step and owner is not None:  # the latest step's slot, reused
                        assert owner not in self.held.values(), "a protected slot was taken"
                    if isinstance(effect, LoadSlot):
                        self.runner_slots[effect.slot_id] = effect.adapter_id
                    else:
                        del self.runner_slots[effect.slot_id]
                case AdapterAcquired():
                    self.waiting.remove(effect.request_id)
                    self.held[effect.request_id] = effect.adapter_id
                    self.granted[effect.request_id] += 1
                case AdapterAcquireFailed():
                    self.waiting.remove(effect.request_id)
                case StepAdaptersReady():
                    assert in_step
                    for assignment in effect.slots:  # uploads were sent before the reply
                        assert self.runner_slots[assignment.slot_id] == assignment.adapter_id
                    self.latest = {a.slot_id: a.adapter_id for a in effect.slots}
                    assert len(self.latest) == len(effect.slots)
                case AdapterOpDone():
                    self.open_ops.remove(effect.op_id)

    def _name(self, index: int, registered: bool) -> str:
        """Mostly a registered name, so that acquires and unloads do something."""
        names = (
            sorted(self.reg.by_name) if registered and self.reg.by_name else ["a", "b", "c", "d"]
        )
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
        if self.pending and self.reg.entries[self.pending[-1]].name == name:
            self._apply(self.reg.finish_load(self.pending.pop(), object(), 4, 0.0))

    @precondition(lambda self: self.pending)
    @rule(index=st.integers(0, 7), fail=st.integers(0, 3))
    def finish_load(self, index: int, fail: int) -> None:
        adapter_id = self.pending.pop(index % len(self.pending))
        if fail:
            self._apply(self.reg.finish_load(adapter_id, object(), 4, 0.0))
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

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 7))
    def release(self, index: int) -> None:
        request_id = sorted(self.held)[index % len(self.held)]
        self.released[request_id] += 1
        self._apply(self.reg.release(request_id, self.held.pop(request_id)))

    @precondition(lambda self: self.held)
    @rule(picks=st.lists(st.integers(0, 7), min_size=1, max_size=4))
    def step(self, picks: list[int]) -> None:
        held_ids = sorted(set(self.held.values()))
        wanted = [held_ids[i % len(held_ids)] for i in picks]
        effects = self.reg.prepare_step(StepId(self._next()), wanted)
        num_uploads = sum(isinstance(e, LoadSlot) for e in effects)  # --hypothesis-show-statistics
        event(
            f"step: {len(set(wanted))} adapters, {self.reg.num_slots} slots, {num_uploads} uploads"
        )
        self._apply(effects, in_step=True)

    @invariant()
    def invariants_hold(self) -> None:
        self.reg.check_invariants()

    def teardown(self) -> None:
        if not hasattr(self, "reg"):
            return
        self._drain()
        assert not self.waiting, "an acquire still waits although nothing holds anything"
        for name in list(self.reg.by_name):
            self._unload(name)
        self._drain()
        self.reg.check_invariants()
        assert self.reg.entries == {}
        assert self.reg.slots == [None] * self.reg.num_slots
        assert self.runner_slots == {}, "a slot was never cleared"
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
                self._apply(self.reg.finish_load(self.pending.pop(0), object(), 4, 0.0))
                self.reg.check_invariants()
        raise AssertionError("the registry never drained")


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
