"""The prefix cache inside the scheduler's step pipeline, over the real planner, plan builder and
arena with LoRA rows: random requests (shared system prompts, identical prompts, several adapters
and the base model), up to two steps in flight whose tokens land one step late (the overlap
schedule), finishes, aborts, preemptions, unloads and reloads (a fresh version), flushes.

A simulated device runs each step when it is sent (steps run in launch order): it writes each
row's new positions as (adapter version of the plan's row, the true tokens up to and including
the position), reads every computed position of every row it samples for, and keeps the sampled
token until the step lands; an upload wipes the pages under its rows (rows and pages overlay). So
a page freed while shared, a hit across adapters or versions, a cached page under an adapter's
rows, a page published before its tokens are known, or a write into a page someone else reads
fails the run. After every rule the planner's tables agree (arena, residency, cache; every KV
page owned by one running request or by the cache); at the end every request finishes without
new ones coming (none waits forever on memory the cache keeps), and with the cache flushed and
every adapter retired, nothing is left allocated.

Two mutants of the cache's key (no adapter; the adapter's name instead of its version) must
fail this machine.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from lorasrv.engine import prefix_pages
from lorasrv.engine.planner import Planner
from lorasrv.engine.policy import PlanLimits
from lorasrv.engine.prefix_cache import Namespace
from lorasrv.engine.prefix_pages import Written, written_by
from lorasrv.engine.sequence import SeqStatus, Sequence, stop_reason
from lorasrv.engine.step_plan import build_step_plan
from lorasrv.ids import AdapterId, RequestId, SeqId, StepId
from lorasrv.messages import AdapterRows, SamplingParams, StepPlan
from tests.unit.planner_fixtures import PAGE_SIZE, ready

SYSTEM_PROMPTS = ((), (1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 6, 6, 6, 6), (7,) * 12)
RANKS = (0, 2, 4, 8)  # adapter names 1-3 (0: the base model)
VERSION_STEP = 1000  # adapter name n's versions: n * VERSION_STEP + reloads
CONTEXT = 32
Slot = tuple[Namespace, tuple[int, ...]]


def next_token(namespace: Namespace, tokens: list[int]) -> int:
    return (sum(tokens) + len(tokens) + (namespace or 0)) % 3


class PrefixPipelineMachine(RuleBasedStateMachine):
    @initialize(
        num_pages=st.integers(16, 60),
        row_bytes=st.sampled_from([50, 100, 250]),
        cap=st.one_of(st.none(), st.integers(1, 3)),
        budget=st.sampled_from([6, 16, 64]),
        overlap=st.booleans(),
    )
    def setup(
        self, num_pages: int, row_bytes: int, cap: int | None, budget: int, overlap: bool
    ) -> None:
        limits = PlanLimits(token_budget=budget, max_running=5, page_size=PAGE_SIZE,
                            context_length=CONTEXT, starvation_steps=4)  # fmt: skip
        p = Planner(ready(num_pages, 100, row_bytes), limits, max_loras_per_batch=cap,
                    eviction_policy="lru")  # fmt: skip
        assume(p.capacity >= 1)  # else the engine refuses to start (wiring.lora_capacity)
        self.p = p
        self.max_in_flight = 2 if overlap else 1
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.live: dict[SeqId, Sequence] = {}
        self.truth: dict[SeqId, list[int]] = {}  # prompt + every token the device sampled
        self.in_flight: deque[tuple[StepPlan, tuple[Written, ...]]] = deque()
        self.step_no = 0
        self.prefill_turn = True
        self.next_id = 0
        self.versions = {name: AdapterId(name * VERSION_STEP) for name in (1, 2, 3)}
        self.known: set[AdapterId] = set()
        self.retired: set[AdapterId] = set()
        self.kv: dict[tuple[int, int], Slot] = {}  # (page, slot) -> what its KV is

    # ------------------------------------------------------------------ rules

    @rule(adapter=st.integers(0, 3), system=st.sampled_from(SYSTEM_PROMPTS),
          user=st.lists(st.integers(0, 2), max_size=6), copies=st.integers(1, 3),
          max_new=st.integers(1, 8))  # fmt: skip
    def enqueue(
        self, adapter: int, system: tuple[int, ...], user: list[int], copies: int, max_new: int
    ) -> None:
        """A request (`copies` > 1: SGLang's n samples of one prompt)."""
        tokens = (*system, *user) or (0,)
        for _ in range(copies):
            s = Sequence(SeqId(self.next_id), RequestId(f"r{self.next_id}"), tokens,
                         SamplingParams(max_new_tokens=max_new))  # fmt: skip
            self.next_id += 1
            if adapter:
                s.adapter_id, s.adapter_rank = self.versions[adapter], RANKS[adapter]
                self.known.add(s.adapter_id)
            s.status, s.waiting_since_step = SeqStatus.WAITING, self.step_no
            self.waiting.append(s)
            self.live[s.seq_id] = s
            self.truth[s.seq_id] = list(tokens)

    @rule(moves=st.lists(st.booleans(), min_size=1, max_size=6))
    def steps(self, moves: list[bool]) -> None:
        """Send a step (True, while fewer than the limit are in flight) or land the oldest."""
        for send in moves:
            if send and len(self.in_flight) < self.max_in_flight:
                self._send()
            elif self.in_flight:
                self._land()

    # One rule for what ends requests or drops cached pages, so that steps and requests (which
    # fill the cache) are drawn more often (hypothesis picks rules uniformly).
    @rule(op=st.sampled_from(("abort", "abort", "reload", "flush")), pick=st.integers(0, 20))
    def drop(self, op: str, pick: int) -> None:
        if op == "abort":
            if self.live:
                self._end(self.live[sorted(self.live)[pick % len(self.live)]])
        elif op == "reload":
            self._reload(1 + pick % 3)
        else:
            event(f"flush: {min(self.p.cache.flush(), 2)}+ pages")

    # ------------------------------------------------------------------ the scheduler's part

    def _send(self) -> bool:
        """Plan and send a step; whether it has rows."""
        self.step_no += 1
        cached = self.p.cache.num_pages
        planned = self.p.plan(self.running, self.waiting, self.step_no,
                              prefill_turn=self.prefill_turn)  # fmt: skip
        decision = planned.decision
        if self.p.cache.num_pages < cached:
            event("a plan took unused cached pages (KV or adapter demand)")
        for s in decision.preempted:
            s.in_runner = False
            event(f"preempted, tokens in flight: {s.num_pending > 0}")
        for s in decision.exhausted:
            self._end(s)
        if not decision.rows:
            self._wipe_uploads(planned.uploads)
            return False
        self.prefill_turn = not decision.is_prefill_only
        hits = sum(1 for r in decision.rows if r.seq.num_computed and not r.seq.in_runner)
        event(f"rows {min(len(decision.rows), 3)}+, hits {min(hits, 2)}+")
        plan = build_step_plan(StepId(self.step_no), decision.rows, planned.adapters,
                               planned.uploads, ())  # fmt: skip
        self.in_flight.append((plan, written_by(r.seq for r in decision.rows)))
        self._run_on_device(plan)
        return True

    def _land(self) -> None:
        """The oldest step's tokens reach the host: settle its pages, append, check stops."""
        plan, written = self.in_flight.popleft()
        self.p.cache.settle(written)
        for seq_id in itertools.compress(plan.seq_ids, plan.sample_rows):
            s = self.live.get(seq_id)
            if s is None:
                continue  # it ended while this step ran: the token is dropped
            s.num_pending -= 1
            token = self.truth[seq_id][len(s.prompt_ids) + len(s.output_ids)]
            s.output_ids.append(token)
            if stop_reason(s, token, frozenset(), CONTEXT)[0] is not None:
                self._end(s)

    def _end(self, s: Sequence) -> None:
        if s.status is SeqStatus.RUNNING:
            self.running.remove(s)
        elif s.status is SeqStatus.WAITING:
            self.waiting.remove(s)
        self.p.cache.release(s)
        s.status = SeqStatus.FINISHED
        del self.live[s.seq_id]

    def _reload(self, adapter: int) -> None:
        """Unloaded: no new request gets the version; once drained it is retired. A load under
        the same name is a fresh version."""
        old = self.versions[adapter]
        self.versions[adapter] = AdapterId(old + 1)
        if old in self.known and not any(s.adapter_id == old for s in self.live.values()):
            self.p.retire(old)
            self.retired.add(old)

    # ------------------------------------------------------------------ the device's part

    def _wipe_uploads(self, uploads: tuple[AdapterRows, ...]) -> None:
        for upload in uploads:  # the rows' bytes overwrite the pages under them
            for row in upload.rows:
                for page in self.p.arena.geometry.row_pages(row):
                    for slot in range(PAGE_SIZE):
                        self.kv.pop((page, slot), None)

    def _run_on_device(self, plan: StepPlan) -> None:
        """Uploads, then each row: write its new positions, read everything if it samples."""
        self._wipe_uploads(plan.uploads)
        device = plan.device_inputs or (False,) * len(plan.seq_ids)
        offset = 0
        for i, seq_id in enumerate(plan.seq_ids):
            start, num_new, table = plan.context_lens[i], plan.query_lens[i], plan.block_tables[i]
            index = plan.lora_adapters[i]
            namespace = None if index < 0 else plan.adapters[index].adapter_id
            truth = self.truth[seq_id]
            if not device[i]:  # the host fed these tokens: they must be the true ones
                assert list(plan.input_ids[offset : offset + num_new]) == truth[start:][:num_new]
            offset += num_new
            for pos in range(start, start + num_new):
                page = table[pos // PAGE_SIZE]
                assert not self.p.cache.cache.owns(page), f"a step writes cached page {page}"
                self.kv[page, pos % PAGE_SIZE] = (namespace, tuple(truth[: pos + 1]))
            if plan.sample_rows[i]:
                assert start + num_new == len(truth), f"seq {seq_id} samples mid-prompt"
                for pos in range(start + num_new):
                    got = self.kv.get((table[pos // PAGE_SIZE], pos % PAGE_SIZE))
                    assert got == (namespace, tuple(truth[: pos + 1])), (
                        f"seq {seq_id} reads the KV of another prefix or adapter at {pos}: {got}"
                    )
                truth.append(next_token(namespace, truth))

    # ------------------------------------------------------------------ invariants

    @invariant()
    def tables_agree(self) -> None:
        if not hasattr(self, "p"):
            return
        self.p.check_invariants(self.running)
        assert all(not s.blocks and not s.prefix for s in self.waiting)
        for s in self.live.values():
            in_flight = sum(s.seq_id in itertools.compress(p.seq_ids, p.sample_rows)
                            for p, _ in self.in_flight)  # fmt: skip
            assert s.num_pending == in_flight

    def teardown(self) -> None:
        if not hasattr(self, "p"):
            return
        # No new requests: they all finish, some within every 100 steps (none waits forever,
        # say for rows the cache keeps, and nothing preempts itself in a circle).
        turn = last_finish = 0
        while self.live or self.in_flight:
            left = len(self.live)
            can_send = len(self.in_flight) < self.max_in_flight and self.live
            if not (can_send and self._send()):
                if self.in_flight:
                    self._land()
                elif len(self.live) == left:  # nothing planned or ended, nothing to wait for
                    raise AssertionError(f"{left} requests left that nothing plans")
            turn += 1
            if len(self.live) < left:
                last_finish = turn
            assert turn - last_finish < 100, f"no request finished in 100 steps ({left} left)"
        self.p.cache.flush()
        for adapter_id in self.known - self.retired:
            self.p.retire(adapter_id)
        self.p.plan(self.running, self.waiting, self.step_no + 1, prefill_turn=True)
        assert self.p.cache.num_pages == 0, "pages cached after a flush with nobody running"
        assert self.p.arena.num_used_pages == 0, "a page leaked"
        assert self.p.arena.num_used_rows == 0, "a row leaked"


SETTINGS = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip

TestPrefixPipeline = PrefixPipelineMachine.TestCase
TestPrefixPipeline.settings = SETTINGS


def _chat_reloaded(machine: PrefixPipelineMachine) -> None:
    """Adapter 1 serves a prompt to the end, is reloaded under its name (its first version
    retired), and its new version gets the same prompt, then the base model does."""
    machine.setup(num_pages=60, row_bytes=100, cap=None, budget=64, overlap=True)
    for adapter in (1, 0):
        machine.enqueue(adapter=adapter, system=SYSTEM_PROMPTS[1], user=[2], copies=1, max_new=2)
        machine.steps([True, True, False, False, True, False, False])
        assert not machine.live, "the request did not finish"
        if adapter:
            assert machine.p.cache.num_pages == 2
            machine.drop("reload", pick=0)
    machine.enqueue(adapter=1, system=SYSTEM_PROMPTS[1], user=[2], copies=1, max_new=2)
    machine.steps([True, True, False, False, True, False, False])


@pytest.mark.parametrize(
    "key",
    [
        lambda s: None,
        lambda s: None if s.adapter_id is None else AdapterId(s.adapter_id // VERSION_STEP),
    ],
    ids=["ignores-the-adapter", "keys-by-name-not-version"],
)
def test_the_machine_catches_a_key_without_the_adapter_version(
    key: Callable[[Sequence], Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Driven step by step through the machine's own rules (a search could miss it)."""
    monkeypatch.setattr(prefix_pages, "namespace_of", key)
    monkeypatch.setattr(f"{__name__}.event", lambda *_: None)
    monkeypatch.setattr(f"{__name__}.assume", lambda *_: None)
    with pytest.raises(AssertionError, match="KV of another prefix or adapter"):
        _chat_reloaded(PrefixPipelineMachine())


def test_the_same_steps_pass_with_the_real_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(f"{__name__}.event", lambda *_: None)
    monkeypatch.setattr(f"{__name__}.assume", lambda *_: None)
    machine = PrefixPipelineMachine()
    _chat_reloaded(machine)
    assert not machine.live
    assert machine.p.cache.num_pages == 2 + 2  # the base's pages and the new version's
    machine.teardown()
