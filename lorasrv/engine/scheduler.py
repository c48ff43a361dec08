"""SchedulerActor: admission, continuous batching, preemption, stop conditions.

Owns every Sequence and the planner (KV pages, LoRA rows, GPU residency), so each step is
planned synchronously: plan -> run -> apply. Never touches tensors: the GPU runner gets a
StepPlan, the tokenizer gets token ids.

The overlap schedule: up to two steps are in flight. Step N+1 is planned and sent as soon as N
is, without N's tokens (they stay on the device and feed N+1's `device_inputs` rows); N's
tokens are applied one step late (stop checks, streaming, freeing), and a row that finished in
N is simply absent from the steps planned after that, its token from N+1 dropped.
`--disable-overlap-schedule`: one step in flight, each planned after the previous one's tokens.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import assert_never

from lorasrv.config import AdapterConfig, SchedulerConfig
from lorasrv.engine import invariants
from lorasrv.engine.actor import Actor, Sender
from lorasrv.engine.outputs import CacheSink
from lorasrv.engine.planner import planner_for
from lorasrv.engine.prefix_pages import Written, written_by
from lorasrv.engine.sequence import (
    SeqStatus,
    Sequence,
    prompt_problem,
    stop_reason,
    token_message,
)
from lorasrv.engine.stats import StatsSink
from lorasrv.engine.step_plan import build_step_plan
from lorasrv.ids import AdapterId, RequestId, SeqId, StepId
from lorasrv.messages import (
    Abort,
    AcquireAdapter,
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterInbox,
    AdapterRetired,
    AdapterRows,
    CacheFlushed,
    Enqueue,
    FlushCache,
    ReleaseAdapter,
    RequestFailed,
    RunnerInbox,
    RunnerReady,
    RunStep,
    SchedulerInbox,
    StepDone,
    StepPlan,
    TokenizerInbox,
)

logger = logging.getLogger(__name__)


class SchedulerActor(Actor[SchedulerInbox]):
    name = "scheduler"

    def __init__(
        self,
        *,
        cfg: SchedulerConfig,
        adapter_cfg: AdapterConfig,
        ready: RunnerReady,
        tokenizer: Sender[TokenizerInbox],
        adapters: Sender[AdapterInbox],
        runner: Sender[RunnerInbox],
        stats: StatsSink | None = None,
        ops: CacheSink | None = None,
    ) -> None:
        super().__init__()
        self._cfg = cfg
        self._ready = ready
        self._eos_ids = frozenset(ready.eos_token_ids)
        self._tokenizer, self._adapters, self._runner = tokenizer, adapters, runner
        self._stats = stats
        self._ops = ops
        self.planner = planner_for(cfg, adapter_cfg, ready)
        self._by_request: dict[RequestId, Sequence] = {}
        self._by_seq: dict[SeqId, Sequence] = {}
        self._running: list[Sequence] = []
        self._waiting: deque[Sequence] = deque()
        self._max_in_flight = 1 if cfg.disable_overlap_schedule else 2
        # Steps with rows sent, awaiting StepDone: id, when sent, what its rows write.
        self._in_flight: deque[tuple[StepId, float, tuple[Written, ...]]] = deque()
        self._step_id = StepId(0)
        self._next_seq_id = 0
        self._freed_in_runner: list[SeqId] = []
        self._last_step = (0.0, 0)  # seconds, sampled tokens
        self._last_done_s = time.monotonic()
        self._num_overlapped = 0  # steps sent while another was in flight
        self._num_dropped = 0  # tokens of rows that had finished by the time they arrived
        self._prefill_turn = True  # cleared after a prefill-only step: decoding rows go next
        self._num_finished = 0
        self._num_aborted = 0

    # ------------------------------------------------------------------ inbox

    def handle(self, msg: SchedulerInbox) -> None:
        match msg:
            case Enqueue():
                self._enqueue(msg)
            case AdapterAcquired():
                self._on_acquired(msg)
            case AdapterAcquireFailed():
                seq = self._by_request.get(msg.request_id)
                if seq is not None:
                    self._finish(seq, failure=(msg.code, msg.detail))
            case AdapterRetired(adapter_id=adapter_id):
                self.planner.retire(adapter_id)
            case StepDone():
                self._apply(msg)
            case Abort(request_id=request_id):
                self._abort(request_id)
            case FlushCache(op_id=op_id):
                num_pages = self.planner.cache.flush()
                if self._ops is not None:
                    self._ops.cache_flushed(CacheFlushed(op_id=op_id, num_pages=num_pages))
            case _:
                assert_never(msg)

    def after_batch(self) -> None:
        while len(self._in_flight) < self._max_in_flight and self._plan_step():
            pass
        if invariants.enabled:
            self.planner.check_invariants(self._running)
        self.publish_stats()

    # ------------------------------------------------------------------ admission

    def _enqueue(self, msg: Enqueue) -> None:
        problem = self._check_fits(msg)
        if problem is not None:
            self._tokenizer.send(
                RequestFailed(request_id=msg.request_id, code=problem[0], detail=problem[1])
            )
            return
        seq = Sequence(SeqId(self._next_seq_id), msg.request_id, msg.prompt_ids, msg.params)
        self._next_seq_id += 1
        self._by_request[msg.request_id] = seq
        self._by_seq[seq.seq_id] = seq
        if msg.lora_name is None:
            self._to_waiting(seq)
        else:
            self._adapters.send(AcquireAdapter(request_id=msg.request_id, lora_name=msg.lora_name))

    def _check_fits(self, msg: Enqueue) -> tuple[str, str] | None:
        if msg.request_id in self._by_request:
            return ("invalid_request", f"request id {msg.request_id!r} is already in use")
        ready = self._ready
        return prompt_problem(
            len(msg.prompt_ids),
            context_length=ready.context_length,
            page_size=ready.page_size,
            max_kv_pages=self.planner.arena.num_pages,
        )

    def _on_acquired(self, msg: AdapterAcquired) -> None:
        seq = self._by_request.get(msg.request_id)
        if seq is None or seq.status is not SeqStatus.ACQUIRING:
            # Aborted while acquiring: the reference is released here, exactly once.
            self._release(msg.request_id, msg.adapter_id)
            return
        seq.adapter_id = msg.adapter_id
        seq.adapter_rank = msg.rank
        seq.is_pinned_adapter = msg.pinned
        self._to_waiting(seq)

    def _to_waiting(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        seq.waiting_since_step = self._step_id
        self._waiting.append(seq)

    # ------------------------------------------------------------------ step pipeline

    def _plan_step(self) -> bool:
        """Plan and send the next step; whether it has rows (then its StepDone will come)."""
        if not self._running and not self._waiting:
            self._send_rowless(())
            return False
        planned = self.planner.plan(
            self._running, self._waiting, self._step_id, prefill_turn=self._prefill_turn
        )
        decision = planned.decision
        for seq in decision.preempted:
            self._drop_runner_state(seq)
            logger.info("preempted %s (seq %d) for lack of KV pages", seq.request_id, seq.seq_id)
        for seq in decision.exhausted:
            logger.warning("%s cannot get the KV pages it needs; finishing it", seq.request_id)
            self._finish(seq, reason="length")
        if not decision.rows:
            self._send_rowless(planned.uploads)
            return False
        self._prefill_turn = not decision.is_prefill_only
        self._step_id = StepId(self._step_id + 1)
        self._num_overlapped += bool(self._in_flight)
        freed, self._freed_in_runner = tuple(self._freed_in_runner), []
        plan = build_step_plan(
            self._step_id, decision.rows, planned.adapters, planned.uploads, freed
        )
        written = written_by(row.seq for row in decision.rows)
        self._in_flight.append((self._step_id, time.monotonic(), written))
        self._runner.send(RunStep(plan=plan))
        return True

    def _send_rowless(self, uploads: tuple[AdapterRows, ...]) -> None:
        """No rows to run: still drop finished sequences' runner state and start the uploads
        (the runner does not reply to a plan without rows)."""
        if self._freed_in_runner or uploads:
            freed, self._freed_in_runner = tuple(self._freed_in_runner), []
            plan = StepPlan(step_id=self._step_id, freed_seq_ids=freed, uploads=uploads)
            self._runner.send(RunStep(plan=plan))

    def _apply(self, msg: StepDone) -> None:
        """A step's tokens, one step late: append, check stops, stream, finish."""
        if not self._in_flight or msg.step_id != self._in_flight[0][0]:
            logger.warning("stale StepDone for step %d", msg.step_id)
            return
        _, sent_s, written = self._in_flight.popleft()
        self.planner.cache.settle(written)  # full pages it wrote join the prefix cache
        result = msg.result
        for i, (seq_id, token_id) in enumerate(zip(msg.seq_ids, result.token_ids, strict=True)):
            seq = self._by_seq.get(seq_id)
            if seq is None:
                self._num_dropped += 1  # it finished (or was aborted) while this step ran
                continue
            seq.num_pending -= 1
            seq.output_ids.append(token_id)
            reason, matched = stop_reason(seq, token_id, self._eos_ids, self._ready.context_length)
            self._tokenizer.send(token_message(seq, result, i, reason, matched))
            if reason is not None:
                self._finish(seq, reason=reason, notify=False)
        # The GPU ran it from when it was sent or the previous step ended, whichever is later.
        now = time.monotonic()
        self._last_step = (now - max(sent_s, self._last_done_s), len(result.token_ids))
        self._last_done_s = now

    # ------------------------------------------------------------------ endings

    def _abort(self, request_id: RequestId) -> None:
        seq = self._by_request.get(request_id)
        if seq is not None:
            self._finish(seq, reason="abort")

    def _finish(
        self,
        seq: Sequence,
        *,
        reason: str | None = None,
        failure: tuple[str, str] | None = None,
        notify: bool = True,
    ) -> None:
        """The one exit: pages freed, adapter released exactly once, runner state dropped."""
        if seq.status is SeqStatus.RUNNING:
            self._running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self._waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        self._num_finished += 1
        self._num_aborted += reason == "abort"
        self.planner.cache.release(seq)  # cached pages back to the cache, the rest freed
        self._drop_runner_state(seq)
        if seq.adapter_id is not None:
            self._release(seq.request_id, seq.adapter_id)
            seq.adapter_id = None
        del self._by_request[seq.request_id]
        del self._by_seq[seq.seq_id]
        if failure is not None:
            self._tokenizer.send(
                RequestFailed(request_id=seq.request_id, code=failure[0], detail=failure[1])
            )
        elif notify:
            self._tokenizer.send(token_message(seq, None, 0, reason, None))

    def _release(self, request_id: RequestId, adapter_id: AdapterId) -> None:
        self._adapters.send(ReleaseAdapter(request_id=request_id, adapter_id=adapter_id))

    def _drop_runner_state(self, seq: Sequence) -> None:
        if seq.in_runner:
            seq.in_runner = False
            self._freed_in_runner.append(seq.seq_id)

    def publish_stats(self) -> None:
        if self._stats is None:
            return
        step_s, num_sampled = self._last_step
        self._stats.scheduler_stats(
            self.planner.memory_stats()._replace(
                num_running=len(self._running),
                num_waiting=len(self._waiting),
                num_acquiring=len(self._by_request) - len(self._running) - len(self._waiting),
                last_step_s=step_s,
                last_step_tokens=num_sampled,
                num_steps=int(self._step_id),
                num_finished=self._num_finished,
                num_aborted=self._num_aborted,
                num_steps_overlapped=self._num_overlapped,
                num_tokens_dropped=self._num_dropped,
            )
        )
