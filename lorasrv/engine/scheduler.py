"""SchedulerActor: admission, continuous batching, preemption, stop conditions.

Owns every Sequence, the KV page pool and the step pipeline (plan -> adapters -> run -> apply).
Never touches tensors: the GPU runner gets a StepPlan, the tokenizer gets token ids.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from typing import assert_never

from lorasrv.config import SchedulerConfig
from lorasrv.engine.actor import Actor, Sender
from lorasrv.engine.block_pool import BlockPool, pages_needed
from lorasrv.engine.policy import PlanLimits, Row, plan_batch
from lorasrv.engine.sequence import SeqStatus, Sequence, stop_reason
from lorasrv.engine.stats import SchedulerStats, StatsSink
from lorasrv.engine.step_plan import build_step_plan, has_prefill_work
from lorasrv.ids import AdapterId, RequestId, SeqId, StepId
from lorasrv.messages import (
    Abort,
    AcquireAdapter,
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterInbox,
    EmitTokens,
    Enqueue,
    PrepareStep,
    ReleaseAdapter,
    RequestFailed,
    RunnerInbox,
    RunnerReady,
    RunStep,
    SchedulerInbox,
    StepAdaptersReady,
    StepDone,
    StepPlan,
    TokenizerInbox,
)

logger = logging.getLogger(__name__)


class _Phase(enum.Enum):
    IDLE = "idle"
    PREPARING = "preparing"  # waiting for StepAdaptersReady
    RUNNING = "running"  # waiting for StepDone


class SchedulerActor(Actor[SchedulerInbox]):
    name = "scheduler"

    def __init__(
        self,
        *,
        cfg: SchedulerConfig,
        ready: RunnerReady,
        tokenizer: Sender[TokenizerInbox],
        adapters: Sender[AdapterInbox],
        runner: Sender[RunnerInbox],
        stats: StatsSink | None = None,
    ) -> None:
        super().__init__()
        self._cfg = cfg
        self._ready = ready
        self._eos_ids = frozenset(ready.eos_token_ids)
        self._tokenizer, self._adapters, self._runner = tokenizer, adapters, runner
        self._stats = stats
        self._pool = BlockPool(ready.num_kv_pages)
        self._by_request: dict[RequestId, Sequence] = {}
        self._by_seq: dict[SeqId, Sequence] = {}
        self._running: list[Sequence] = []
        self._waiting: deque[Sequence] = deque()
        self._phase = _Phase.IDLE
        self._rows: list[Row] = []
        self._step_id = StepId(0)
        self._step_started_s = 0.0
        self._next_seq_id = 0
        self._num_pinned = 0
        self._freed_in_runner: list[SeqId] = []
        self._last_step = (0.0, 0)  # seconds, sampled tokens
        self._prefill_turn = True  # cleared after a prefill-only step: decoding rows go next
        self._prefill_blocked = False  # the last plan tried prefill work and could start none
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
            case StepAdaptersReady():
                self._on_adapters_ready(msg)
            case StepDone():
                self._apply(msg)
            case Abort(request_id=request_id):
                self._abort(request_id)
            case _:
                assert_never(msg)

    def after_batch(self) -> None:
        if self._phase is _Phase.IDLE:
            self._plan_step()
        self._publish_stats()

    # ------------------------------------------------------------------ admission

    def _enqueue(self, msg: Enqueue) -> None:
        problem = self._check_fits(msg)
        if problem is not None:
            self._tokenizer.send(
                RequestFailed(request_id=msg.request_id, code=problem[0], detail=problem[1])
            )
            return
        seq = Sequence(
            seq_id=SeqId(self._next_seq_id),
            request_id=msg.request_id,
            prompt_ids=msg.prompt_ids,
            params=msg.params,
            lora_name=msg.lora_name,
            arrival_s=msg.arrival_s,
        )
        self._next_seq_id += 1
        self._by_request[msg.request_id] = seq
        self._by_seq[seq.seq_id] = seq
        if msg.lora_name is None:
            self._to_waiting(seq)
        else:
            self._adapters.send(AcquireAdapter(request_id=msg.request_id, lora_name=msg.lora_name))

    def _check_fits(self, msg: Enqueue) -> tuple[str, str] | None:
        num_prompt = len(msg.prompt_ids)
        if num_prompt >= self._ready.context_length:
            return (
                "prompt_too_long",
                f"prompt has {num_prompt} tokens; the context length is "
                f"{self._ready.context_length} (prompt plus at least one new token)",
            )
        needed = pages_needed(num_prompt + 1, self._ready.page_size)
        if needed > self._pool.num_pages:
            return (
                "prompt_too_long",
                f"prompt needs {needed} KV pages; the whole KV cache has {self._pool.num_pages}",
            )
        if msg.request_id in self._by_request:
            return ("invalid_request", f"request id {msg.request_id!r} is already in use")
        return None

    def _on_acquired(self, msg: AdapterAcquired) -> None:
        self._num_pinned = msg.num_pinned
        seq = self._by_request.get(msg.request_id)
        if seq is None or seq.status is not SeqStatus.ACQUIRING:
            # Aborted while acquiring: the reference is released here, exactly once.
            self._release(msg.request_id, msg.adapter_id)
            return
        seq.adapter_id = msg.adapter_id
        seq.is_pinned_adapter = msg.pinned
        self._to_waiting(seq)

    def _to_waiting(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        seq.waiting_since_step = self._step_id
        self._waiting.append(seq)

    # ------------------------------------------------------------------ step pipeline

    def _plan_step(self) -> None:
        if not self._running and not self._waiting:
            self._flush_freed()
            return
        limits = PlanLimits(
            token_budget=self._cfg.chunked_prefill_size,
            max_running=self._cfg.max_running_requests,
            num_slots=self._ready.num_lora_slots,
            num_pinned=self._num_pinned,
            page_size=self._ready.page_size,
            context_length=self._ready.context_length,
            mixed_chunk=self._cfg.enable_mixed_chunk,
            lookahead=not self._cfg.disable_overlap_schedule,
        )
        decision = plan_batch(
            self._running, self._waiting, self._pool, limits, self._step_id,
            prefill_turn=self._prefill_turn,
        )  # fmt: skip
        # Prefill had its turn and nothing could start (no pages, slots or room): the waiting
        # requests do not make the next step a prefill step by themselves.
        self._prefill_blocked = self._prefill_turn and not decision.is_prefill_only
        for seq in decision.preempted:
            self._drop_runner_state(seq)
            logger.info("preempted %s (seq %d) for lack of KV pages", seq.request_id, seq.seq_id)
        for seq in decision.exhausted:
            logger.warning("%s fills the whole KV cache; finishing it", seq.request_id)
            self._finish(seq, reason="length")
        if not decision.rows:
            self._unstick()
            return
        self._step_id = StepId(self._step_id + 1)
        self._prefill_turn = not decision.is_prefill_only
        self._rows = decision.rows
        adapter_ids = tuple({r.seq.adapter_id for r in self._rows if r.seq.adapter_id is not None})
        if adapter_ids:
            self._phase = _Phase.PREPARING
            self._adapters.send(PrepareStep(step_id=self._step_id, adapter_ids=adapter_ids))
        else:
            self._send_step({}, frozenset())

    def _unstick(self) -> None:
        """Nothing could run: if nothing runs at all, the head of the queue can never fit."""
        if self._running or not self._waiting:
            return
        head = self._waiting[0]
        if head.adapter_id is not None and self._num_pinned >= self._ready.num_lora_slots:
            return  # waits for a pinned adapter to go away; nothing else to do
        if self._pool.num_free == self._pool.num_pages:
            self._waiting.popleft()
            self._finish(head, reason="length")

    def _on_adapters_ready(self, msg: StepAdaptersReady) -> None:
        if self._phase is not _Phase.PREPARING or msg.step_id != self._step_id:
            logger.warning("stale StepAdaptersReady for step %d", msg.step_id)
            return
        self._num_pinned = msg.num_pinned
        slots = {a.adapter_id: int(a.slot_id) for a in msg.slots}
        self._send_step(slots, frozenset(msg.deferred))

    def _send_step(self, slots: dict[AdapterId, int], deferred: frozenset[AdapterId]) -> None:
        rows = [
            r
            for r in self._rows
            if r.seq.status is SeqStatus.RUNNING and r.seq.adapter_id not in deferred
        ]
        rows.sort(key=lambda r: -1 if r.seq.adapter_id is None else slots[r.seq.adapter_id])
        self._rows = rows
        if not rows:
            self._phase = _Phase.IDLE
            self._flush_freed()
            return
        freed, self._freed_in_runner = tuple(self._freed_in_runner), []
        self._phase = _Phase.RUNNING
        self._step_started_s = time.monotonic()
        expect_next_decode = self._prefill_blocked or not has_prefill_work(
            rows, self._running, self._waiting
        )
        plan = build_step_plan(
            self._step_id, rows, slots, freed,
            expect_next_decode=expect_next_decode, context_length=self._ready.context_length,
        )  # fmt: skip
        self._runner.send(RunStep(plan=plan))

    def _flush_freed(self) -> None:
        """Drop runner-side state of finished sequences even when no step follows."""
        if self._freed_in_runner:
            plan = StepPlan(step_id=self._step_id, freed_seq_ids=tuple(self._freed_in_runner))
            self._freed_in_runner = []
            self._runner.send(RunStep(plan=plan))  # no rows: the runner does not reply

    def _apply(self, msg: StepDone) -> None:
        if self._phase is not _Phase.RUNNING or msg.step_id != self._step_id:
            logger.warning("stale StepDone for step %d", msg.step_id)
            return
        self._phase = _Phase.IDLE
        has_logprobs = bool(msg.logprobs)
        for i, (seq_id, token_id) in enumerate(zip(msg.seq_ids, msg.token_ids, strict=True)):
            seq = self._by_seq.get(seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue  # aborted while the step ran
            seq.output_ids.append(token_id)
            reason, matched = stop_reason(seq, token_id, self._eos_ids, self._ready.context_length)
            self._tokenizer.send(
                EmitTokens(
                    request_id=seq.request_id,
                    token_ids=(token_id,),
                    logprobs=(msg.logprobs[i],) if has_logprobs else (),
                    top_logprobs=(msg.top_logprobs[i],) if msg.top_logprobs else (),
                    finish_reason=reason,
                    matched_stop=matched,
                    prompt_tokens=len(seq.prompt_ids),
                )
            )
            if reason is not None:
                self._finish(seq, reason=reason, notify=False)
        self._last_step = (time.monotonic() - self._step_started_s, len(msg.token_ids))

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
        self._pool.free(seq.blocks)
        seq.blocks.clear()
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
            self._tokenizer.send(
                EmitTokens(
                    request_id=seq.request_id,
                    token_ids=(),
                    finish_reason=reason,
                    prompt_tokens=len(seq.prompt_ids),
                )
            )

    def _release(self, request_id: RequestId, adapter_id: AdapterId) -> None:
        self._adapters.send(ReleaseAdapter(request_id=request_id, adapter_id=adapter_id))

    def _drop_runner_state(self, seq: Sequence) -> None:
        if seq.in_runner:
            seq.in_runner = False
            self._freed_in_runner.append(seq.seq_id)

    def _publish_stats(self) -> None:
        if self._stats is None:
            return
        step_s, num_sampled = self._last_step
        self._stats.scheduler_stats(
            SchedulerStats(
                num_running=len(self._running),
                num_waiting=len(self._waiting),
                num_acquiring=len(self._by_request) - len(self._running) - len(self._waiting),
                num_kv_pages=self._pool.num_pages,
                num_kv_pages_used=self._pool.num_used,
                last_step_s=step_s,
                last_step_tokens=num_sampled,
                num_steps=int(self._step_id),
                num_finished=self._num_finished,
                num_aborted=self._num_aborted,
            )
        )
