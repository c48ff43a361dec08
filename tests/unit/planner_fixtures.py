"""Shared by the planner's tests: a small arena, a planner over it, sequences, and queues that
run each planned step as the scheduler would."""

from __future__ import annotations

from collections import deque

from lorasrv.engine.planner import Planned, Planner
from lorasrv.engine.policy import PlanLimits
from lorasrv.engine.sequence import SeqStatus, Sequence
from lorasrv.ids import AdapterId, RequestId, SeqId
from lorasrv.messages import RunnerReady, SamplingParams

PAGE_SIZE = 4


def ready(num_pages: int, page_bytes: int = 100, row_bytes: int = 100) -> RunnerReady:
    return RunnerReady(
        num_kv_pages=num_pages,
        page_size=PAGE_SIZE,
        kv_page_bytes=page_bytes,
        lora_row_bytes=row_bytes,
        lora_max_rows=num_pages * page_bytes // row_bytes,
        max_lora_rank=8,
        lora_target_modules=("q_proj",),
        vocab_size=100,
        context_length=32,
        eos_token_ids=(0,),
        device="cpu",
        dtype="float32",
    )


def planner(
    num_pages: int = 100, cap: int | None = None, policy: str = "lru", **limits: int
) -> Planner:
    plan_limits = PlanLimits(
        token_budget=limits.get("budget", 64), max_running=limits.get("max_running", 16),
        page_size=PAGE_SIZE, context_length=32, starvation_steps=limits.get("starve", 4),
    )  # fmt: skip
    return Planner(
        ready(num_pages),
        plan_limits,
        max_loras_per_batch=cap,
        eviction_policy="fifo" if policy == "fifo" else "lru",
        prefix_cache=False,  # test_prefix_planner.py: the planner with it
    )


def seq(
    i: int, adapter: int | None = None, rank: int = 8, prompt: int = 4, new: int = 128
) -> Sequence:
    params = SamplingParams(max_new_tokens=new)
    s = Sequence(SeqId(i), RequestId(f"r{i}"), tuple(range(1, prompt + 1)), params)
    s.adapter_id = None if adapter is None else AdapterId(adapter)
    s.adapter_rank = rank if adapter is not None else 0
    s.status = SeqStatus.WAITING
    return s


class Queues:
    def __init__(self, p: Planner) -> None:
        self.p = p
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.step_no = 0

    def plan(self, prefill_turn: bool = True) -> Planned:
        self.step_no += 1
        planned = self.p.plan(self.running, self.waiting, self.step_no, prefill_turn=prefill_turn)
        for row in planned.decision.rows:  # run the step
            row.seq.num_computed += row.num_new
        self.settle(planned)
        for row in planned.decision.rows:  # every sampled row gets a token
            if row.seq.num_computed == row.seq.num_tokens:
                row.seq.output_ids.append(5)
        self.p.check_invariants(self.running)
        return planned

    def settle(self, planned: Planned) -> None:
        """The step's tokens are applied (here: nothing more to do; the prefix tests settle
        its pages into the cache)."""

    def finish(self, s: Sequence) -> None:
        self.running.remove(s)
        self.p.cache.release(s)
        s.status = SeqStatus.FINISHED


def ids(planned: Planned) -> list[int]:
    return sorted(r.seq.seq_id for r in planned.decision.rows)
