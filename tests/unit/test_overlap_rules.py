"""The overlap schedule's pure rules: tokens in flight (`Sequence.num_pending`) in the stop checks,
the plan's device inputs (`build_step_plan`), the host-side filling of device inputs
(`HostInputs`), and a hypothesis machine that plans with up to two steps in flight, lands their
tokens one step late in random order with finishes, aborts and preemptions, and checks that
nothing runs past its limits, no token is fed from the host before it is there, and every page
comes back."""

from __future__ import annotations

import itertools
from collections import deque

import msgspec
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lorasrv.engine.planner import Planner
from lorasrv.engine.policy import PlanLimits, Row
from lorasrv.engine.sequence import SeqStatus, Sequence, stop_reason
from lorasrv.engine.step_plan import build_step_plan
from lorasrv.engine.step_runner import HostInputs
from lorasrv.ids import BlockId, RequestId, SeqId, StepId
from lorasrv.messages import RunnerReady, SamplingParams, StepPlan, StepResult
from tests.unit.planner_fixtures import ready

EOS = 0


def no_rows(pages: int) -> RunnerReady:
    """A runner with KV pages only (LoRA off)."""
    return msgspec.structs.replace(ready(pages), lora_row_bytes=0, lora_max_rows=0)


def make_seq(i: int, prompt: int = 5, **params: object) -> Sequence:
    seq = Sequence(SeqId(i), RequestId(f"r{i}"), tuple(range(1, prompt + 1)),
                   SamplingParams(**params))  # fmt: skip
    seq.status = SeqStatus.RUNNING
    return seq


def test_pending_tokens_count_for_the_limits_but_not_for_the_stop_checks() -> None:
    seq = make_seq(0, prompt=5, max_new_tokens=3)
    seq.output_ids = [9]
    seq.num_pending = 2
    assert seq.num_tokens == 8
    assert not seq.can_grow(context_length=100)  # its third and last token is on its way
    seq.num_pending = 1
    assert seq.can_grow(context_length=100)
    assert not seq.can_grow(context_length=7)  # 7 tokens with the one in flight
    # the host's check looks at the tokens it has: the token in flight is not one yet
    seq.output_ids.append(10)
    assert stop_reason(seq, 10, frozenset({EOS}), context_length=8) == (None, None)
    assert stop_reason(seq, 10, frozenset({EOS}), context_length=7) == ("length", None)


def test_a_plan_feeds_tokens_in_flight_from_the_device() -> None:
    waiting_for_token = make_seq(0, prompt=3)
    waiting_for_token.output_ids, waiting_for_token.num_pending = [8], 1
    waiting_for_token.num_computed = 4  # prompt and its first token; its second is in flight
    on_host = make_seq(1, prompt=2)
    on_host.output_ids, on_host.num_computed = [6], 2
    for seq in (waiting_for_token, on_host):
        seq.in_runner = True
        seq.blocks = [seq.seq_id]
    plan = build_step_plan(StepId(4), [Row(waiting_for_token, 1), Row(on_host, 1)], (), (), ())
    assert plan.device_inputs == (True, False)
    assert plan.input_ids == (0, 6)
    assert plan.context_lens == (4, 2)
    assert (waiting_for_token.num_pending, on_host.num_pending) == (2, 1)
    assert (waiting_for_token.num_computed, on_host.num_computed) == (5, 3)
    # no row in flight: no field at all (a decode step's plan stays small)
    assert build_step_plan(StepId(5), [], (), (), ()).device_inputs == ()


def plan(step: int, seqs: list[int], inputs: list[int], lens: list[int], **kw: object) -> StepPlan:
    rows = len(lens)
    return StepPlan(
        step_id=StepId(step), seq_ids=tuple(map(SeqId, seqs)), input_ids=tuple(inputs),
        query_lens=tuple(lens), context_lens=(0,) * rows, block_tables=((BlockId(0),),) * rows,
        lora_adapters=(-1,) * rows, sample_rows=(True,) * rows, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_host_inputs_fill_a_plans_device_inputs_from_the_tokens_returned() -> None:
    inputs = HostInputs()
    prefill = plan(1, [1, 2], [5, 6, 7, 8, 9], [3, 2])
    assert inputs.resolve(prefill) is prefill
    inputs.record(prefill, StepResult(token_ids=(40, 50)))
    decode = plan(2, [1, 3, 2], [0, 11, 12, 0], [1, 2, 1], device_inputs=(True, False, True))
    resolved = inputs.resolve(decode)
    assert resolved.input_ids == (40, 11, 12, 50)
    assert resolved.device_inputs == ()
    # freed sequences are forgotten; a device input nobody sampled is a planner bug
    freed = plan(3, [1], [0], [1], device_inputs=(True,), freed_seq_ids=(SeqId(1),))
    with pytest.raises(ValueError, match="no sampled token"):
        inputs.resolve(freed)


class PipelineMachine(RuleBasedStateMachine):
    """The scheduler's step pipeline over the real planner and plan builder: plan while fewer
    than two steps are in flight, land the oldest step's tokens one step late (a random token may
    be EOS), abort anything; tight pages make preemptions catch tokens in flight."""

    @initialize(pages=st.integers(5, 14), budget=st.sampled_from([5, 16, 64]))
    def setup(self, pages: int, budget: int) -> None:
        limits = PlanLimits(token_budget=budget, max_running=4, page_size=4, context_length=32,
                            starvation_steps=4)  # fmt: skip
        # The prefix cache off: test_prefix_planner_properties runs this pipeline with it.
        self.p = Planner(no_rows(pages), limits, max_loras_per_batch=None, eviction_policy="lru",
                         prefix_cache=False)  # fmt: skip
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.in_flight: deque[StepPlan] = deque()
        self.live: dict[SeqId, Sequence] = {}
        self.step = 0
        self.prefill_turn = True
        self.next_id = 0

    @rule(prompt=st.integers(1, 12), max_new=st.integers(1, 8))
    def enqueue(self, prompt: int, max_new: int) -> None:
        seq = make_seq(self.next_id, prompt=prompt, max_new_tokens=max_new)
        seq.status = SeqStatus.WAITING
        self.next_id += 1
        self.waiting.append(seq)
        self.live[seq.seq_id] = seq

    @precondition(lambda self: len(self.in_flight) < 2)
    @rule()
    def plan_step(self) -> None:
        planned = self.p.plan(self.running, self.waiting, self.step, prefill_turn=self.prefill_turn)
        decision = planned.decision
        for seq in decision.preempted:
            seq.in_runner = False
            event(f"preempted with tokens in flight: {seq.num_pending > 0}")
        for seq in decision.exhausted:
            self.finish(seq)
        if not decision.rows:
            return
        self.prefill_turn = not decision.is_prefill_only
        self.step += 1
        pending_before = {r.seq.seq_id: r.seq.num_pending for r in decision.rows}
        step_plan = build_step_plan(StepId(self.step), decision.rows, (), (), ())
        device = step_plan.device_inputs or (False,) * len(step_plan.seq_ids)
        for seq_id, is_device, n in zip(
            step_plan.seq_ids, device, step_plan.query_lens, strict=True
        ):
            assert is_device == (pending_before[seq_id] > 0)
            assert not is_device or n == 1
        event(f"device inputs: {any(device)}")
        for seq_id in itertools.compress(step_plan.seq_ids, step_plan.sample_rows):
            seq = self.live[seq_id]
            assert len(seq.output_ids) + seq.num_pending <= seq.params.max_new_tokens
            assert seq.num_tokens <= 32
        self.in_flight.append(step_plan)

    @precondition(lambda self: self.in_flight)
    @rule(eos=st.integers(0, 5))
    def land(self, eos: int) -> None:
        """The oldest step's tokens reach the host; `eos` picks a row whose token is EOS."""
        step_plan = self.in_flight.popleft()
        sampled = list(itertools.compress(step_plan.seq_ids, step_plan.sample_rows))
        for i, seq_id in enumerate(sampled):
            seq = self.live.get(seq_id)
            if seq is None:
                event("a token dropped: its row had finished")
                continue
            seq.num_pending -= 1
            token = EOS if i == eos else 7
            seq.output_ids.append(token)
            if stop_reason(seq, token, frozenset({EOS}), 32)[0] is not None:
                self.finish(seq)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 20))
    def abort(self, index: int) -> None:
        seqs = sorted(self.live)
        self.finish(self.live[seqs[index % len(seqs)]])

    def finish(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self.p.arena.free(seq.blocks)  # at once, steps in flight or not
        seq.blocks.clear()
        del self.live[seq.seq_id]

    @invariant()
    def pending_tokens_are_the_steps_in_flight(self) -> None:
        if not hasattr(self, "p"):
            return
        for seq in self.live.values():
            in_flight = sum(seq.seq_id in itertools.compress(p.seq_ids, p.sample_rows)
                            for p in self.in_flight)  # fmt: skip
            assert seq.num_pending == in_flight
            assert seq.num_computed <= seq.num_tokens
            assert len(seq.blocks) * 4 >= seq.num_computed
        self.p.check_invariants(self.running)
        held = sum(len(s.blocks) for s in self.running)
        assert held == self.p.arena.num_used_pages
        assert all(not s.blocks for s in self.waiting)

    def teardown(self) -> None:
        if not hasattr(self, "p"):
            return
        while self.in_flight:
            self.land(eos=99)
        for seq in list(self.live.values()):
            self.finish(seq)
        assert self.p.arena.num_used_pages == 0


TestPipelineMachine = PipelineMachine.TestCase
TestPipelineMachine.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip
