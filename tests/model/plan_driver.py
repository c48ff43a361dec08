"""A minimal scheduler for model tests: page allocation, chunked prefill, decode, via StepPlans.

Drives `ModelRunner.step` the way the engine's scheduler does, without the engine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from lorasrv.ids import BlockId, SeqId, StepId
from lorasrv.messages import NewSeq, SamplingParams, StepPlan

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=1 << 20)


@dataclass
class _Seq:
    seq_id: SeqId
    prompt: list[int]
    slot: int
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    pages: list[int] = field(default_factory=list)
    started: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens


class PlanDriver:
    """Runs prompts to completion through `runner.step`; pages are handed out shuffled.

    As the engine's scheduler does, decode steps also hand each row the page of its next token
    (`lookahead_pages`, policy.py) and mark rows whose next token is their last
    (`mark_last_rows`, step_plan.py), so the runner can launch the next step ahead.
    """

    def __init__(
        self,
        runner: Any,
        *,
        token_budget: int = 16,
        seed: int = 0,
        record_logits: bool = False,
        lookahead_pages: bool = True,
        mark_last_rows: bool = True,
    ) -> None:
        self.runner = runner
        self.token_budget = token_budget
        self.lookahead_pages = lookahead_pages
        self.mark_last_rows = mark_last_rows
        self.page_size: int = runner.page_size
        self.free_pages = list(range(runner.num_kv_pages))
        random.Random(seed).shuffle(self.free_pages)  # non-contiguous block tables
        self.record_logits = record_logits
        self.first_logits: dict[int, torch.Tensor] = {}  # seq_id -> [vocab] at its first sample
        self.num_steps = 0
        self._next_seq_id = 0

    def generate(
        self,
        prompts: list[list[int]],
        slots: list[int] | None = None,
        max_new_tokens: int | list[int] = 32,
    ) -> list[list[int]]:
        """Greedy tokens per prompt; `slots[i]` is the LoRA slot of prompt i (-1 = base);
        `max_new_tokens` for all prompts or one per prompt."""
        seqs = []
        limits = (
            max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        )
        rows = zip(prompts, slots or [-1] * len(prompts), limits, strict=True)
        for prompt, slot, limit in rows:
            seqs.append(_Seq(SeqId(self._next_seq_id), list(prompt), slot, limit))
            self._next_seq_id += 1
        freed: list[SeqId] = []
        while not all(s.done for s in seqs):
            plan, rows = self._plan([s for s in seqs if not s.done], freed)
            self._run(plan, rows)
            freed = [s.seq_id for s in rows if s.done]
            for s in rows:
                if s.done:
                    self.free_pages.extend(s.pages)
                    s.pages = []
        if freed:
            self.runner.step(StepPlan(step_id=StepId(self.num_steps), freed_seq_ids=tuple(freed)))
        return [s.output for s in seqs]

    def _plan(self, active: list[_Seq], freed: list[SeqId]) -> tuple[StepPlan, list[_Seq]]:
        budget = self.token_budget
        chosen: list[tuple[_Seq, int]] = []
        # Decode rows first (one token each), then prefill chunks in arrival order.
        for seq in sorted(active, key=lambda s: s.num_cached < len(s.prompt)):
            query_len = min(len(seq.tokens) - seq.num_cached, budget)
            if query_len <= 0:
                break
            chosen.append((seq, query_len))
            budget -= query_len
        chosen.sort(key=lambda item: item[0].slot)  # rows sorted by LoRA slot, base first
        new_seqs = []
        is_decode = all(n == 1 and s.num_cached == len(s.tokens) - 1 for s, n in chosen)
        ahead = 1 if self.lookahead_pages and is_decode else 0
        for seq, query_len in chosen:
            needed = -(-(seq.num_cached + query_len + ahead) // self.page_size)
            while len(seq.pages) < needed:
                seq.pages.append(self.free_pages.pop())
            if not seq.started:
                seq.started = True
                new_seqs.append(
                    NewSeq(seq_id=seq.seq_id, params=GREEDY, prompt_ids=tuple(seq.prompt))
                )
        plan = StepPlan(
            step_id=StepId(self.num_steps),
            new_seqs=tuple(new_seqs),
            freed_seq_ids=tuple(freed),
            seq_ids=tuple(s.seq_id for s, _ in chosen),
            input_ids=tuple(
                t for s, n in chosen for t in s.tokens[s.num_cached : s.num_cached + n]
            ),
            query_lens=tuple(n for _, n in chosen),
            context_lens=tuple(s.num_cached for s, _ in chosen),
            block_tables=tuple(tuple(BlockId(p) for p in s.pages) for s, _ in chosen),
            lora_slots=tuple(s.slot for s, _ in chosen),
            sample_rows=tuple(s.num_cached + n == len(s.tokens) for s, n in chosen),
            # as the scheduler marks them: the row's next token is its last
            last_rows=tuple(
                self.mark_last_rows
                and s.num_cached + n == len(s.tokens)
                and len(s.output) + 1 >= s.max_new_tokens
                for s, n in chosen
            ),
        )
        return plan, [s for s, _ in chosen]

    def _run(self, plan: StepPlan, rows: list[_Seq]) -> None:
        sampled = [s for s, is_sampled in zip(rows, plan.sample_rows, strict=True) if is_sampled]
        if self.record_logits and any(not s.output for s in sampled):
            logits = self.runner.forward(plan)  # K/V writes are idempotent: step rewrites them
            for seq, row in zip(sampled, logits, strict=True):
                self.first_logits.setdefault(seq.seq_id, row.clone())
        result = self.runner.step(plan)
        self.num_steps += 1
        for seq, n in zip(rows, plan.query_lens, strict=True):
            seq.num_cached += n
        for seq, token in zip(sampled, result.token_ids, strict=True):
            seq.output.append(token)
