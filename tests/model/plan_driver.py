"""A minimal scheduler for model tests: page and LoRA-row allocation in one arena, chunked prefill,
decode, via StepPlans.

Drives `ModelRunner` (or `TpRunner`) the way the engine's scheduler does, without the engine:
adapters get rows from the arena's top (shuffled, so never contiguous), KV pages come from the
rest, and an adapter's upload rides in the next plan. With `overlap`, as the engine's overlap
schedule: each step is launched before the previous one's tokens are read, its continuing rows
fed those tokens on the device (`device_inputs`).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from lorasrv.ids import AdapterId, BlockId, SeqId, StepId
from lorasrv.messages import AdapterRows, HostCopyReady, NewSeq, SamplingParams, StepPlan

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=1 << 20)


@dataclass
class _Seq:
    seq_id: SeqId
    prompt: list[int]
    adapter_id: AdapterId | None
    max_new_tokens: int
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # when the params ask for them
    num_pending: int = 0  # sampled by launched steps, not read yet
    num_cached: int = 0  # tokens whose K/V are in the cache (or queued)
    pages: list[int] = field(default_factory=list)
    started: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output) + self.num_pending

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens

    @property
    def can_grow(self) -> bool:
        return len(self.output) + self.num_pending < self.max_new_tokens


def rows_pages(runner: Any, rows: list[int]) -> set[int]:
    """The KV pages that `rows` overlay, from the runner's reported arena geometry."""
    ready = runner.ready()
    total = ready.num_kv_pages * ready.kv_page_bytes
    offset = total - ready.lora_max_rows * ready.lora_row_bytes
    pages: set[int] = set()
    for row in rows:
        start = offset + row * ready.lora_row_bytes
        end = start + ready.lora_row_bytes
        pages.update(range(start // ready.kv_page_bytes, (end - 1) // ready.kv_page_bytes + 1))
    return pages


class PlanDriver:
    """Runs prompts to completion through `runner.step`; pages and rows are handed out shuffled.

    `overlap`: up to two steps in flight (`runner.launch`), tokens read one step late.
    `lora_rows`: rows set aside for adapters at the arena's top; their pages never hold KV.
    """

    def __init__(
        self,
        runner: Any,
        *,
        token_budget: int = 16,
        seed: int = 0,
        record_logits: bool = False,
        overlap: bool = False,
        lora_rows: int = 0,
        params: SamplingParams = GREEDY,
    ) -> None:
        self.runner = runner
        self.params = params  # every sequence's sampling params
        self.token_budget = token_budget
        self.overlap = overlap
        self.page_size: int = runner.page_size
        max_rows = runner.ready().lora_max_rows
        assert lora_rows <= max_rows, f"{lora_rows} LoRA rows asked, the arena has {max_rows}"
        self.free_rows = list(range(max_rows - lora_rows, max_rows))
        taken = rows_pages(runner, self.free_rows)
        self.free_pages = [p for p in range(runner.num_kv_pages) if p not in taken]
        rng = random.Random(seed)
        rng.shuffle(self.free_pages)  # non-contiguous block tables
        rng.shuffle(self.free_rows)  # non-contiguous adapter rows
        self.adapter_rows: dict[AdapterId, tuple[int, ...]] = {}
        self.pending_uploads: list[AdapterRows] = []
        self.record_logits = record_logits
        self.first_logits: dict[int, torch.Tensor] = {}  # seq_id -> [vocab] at its first sample
        self.num_steps = 0
        self.num_device_inputs = 0  # rows fed a token the host had not read yet
        self.last_logprobs: list[list[float]] = []
        self._next_seq_id = 0

    def add_adapter(
        self, adapter_id: int, host: Any, rows: list[int] | None = None, rank: int | None = None
    ) -> tuple[int, ...]:
        """Hand the runner the host copy and queue its upload into `rows` (default: the next
        free ones) for the next plan; returns the rows. `rank`: the rows it is given (default
        the copy's own rank; more, as a config's r may be, pads it with zero rows)."""
        adapter = AdapterId(adapter_id)
        rank = rank or host.rank
        self.runner.add_host_copy(
            HostCopyReady(adapter_id=adapter, weights=host, rank=rank, scaling=host.scaling)
        )
        if rows is None:
            rows = [self.free_rows.pop() for _ in range(rank)]
        else:
            self.free_rows = [r for r in self.free_rows if r not in rows]
        self.adapter_rows[adapter] = tuple(rows)
        self.pending_uploads.append(AdapterRows(adapter, tuple(rows)))
        return tuple(rows)

    def flush_uploads(self) -> None:
        """Run the queued uploads now, in a plan of their own (no rows)."""
        uploads, self.pending_uploads = tuple(self.pending_uploads), []
        self.runner.step(StepPlan(step_id=StepId(self.num_steps), uploads=uploads))
        self.num_steps += 1

    def remove_adapter(self, adapter_id: int) -> None:
        """Its host copy and rows go (nothing running may use it)."""
        adapter = AdapterId(adapter_id)
        self.runner.drop_host_copy(adapter)
        self.free_rows.extend(self.adapter_rows.pop(adapter))

    def generate(
        self,
        prompts: list[list[int]],
        adapters: list[int | None] | None = None,
        max_new_tokens: int | list[int] = 32,
    ) -> list[list[int]]:
        """Greedy tokens per prompt; `adapters[i]` is the adapter id of prompt i (None = base);
        `max_new_tokens` for all prompts or one per prompt."""
        seqs = []
        limits = (
            max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        )
        rows = zip(prompts, adapters or [None] * len(prompts), limits, strict=True)
        for prompt, adapter, limit in rows:
            adapter_id = AdapterId(adapter) if adapter is not None else None
            seqs.append(_Seq(SeqId(self._next_seq_id), list(prompt), adapter_id, limit))
            self._next_seq_id += 1
        in_flight: deque[tuple[StepPlan, list[_Seq], Any]] = deque()
        freed: list[SeqId] = []
        while not all(s.done for s in seqs):
            runnable = [s for s in seqs if s.can_grow]
            if runnable and len(in_flight) < (2 if self.overlap else 1):
                plan, rows = self._plan(runnable, freed)
                freed = []
                in_flight.append((plan, rows, self._launch(plan, rows)))
                continue
            plan, rows, pending = in_flight.popleft()
            self._read(plan, rows, pending.result())
            for s in rows:
                if s.done and s.pages:
                    freed.append(s.seq_id)
                    self.free_pages.extend(s.pages)
                    s.pages = []
        if freed:
            self.runner.step(StepPlan(step_id=StepId(self.num_steps), freed_seq_ids=tuple(freed)))
            self.num_steps += 1
        self.last_logprobs = [s.logprobs for s in seqs]  # per prompt, when the params ask
        return [s.output for s in seqs]

    def _plan(self, active: list[_Seq], freed: list[SeqId]) -> tuple[StepPlan, list[_Seq]]:
        budget = self.token_budget
        chosen: list[tuple[_Seq, int]] = []
        # Decode rows first (one token each), then prefill chunks in arrival order.
        for seq in sorted(active, key=lambda s: s.num_cached < len(s.prompt)):
            query_len = min(seq.num_tokens - seq.num_cached, budget)
            if query_len <= 0:
                break
            chosen.append((seq, query_len))
            budget -= query_len
        # rows sorted by adapter, base first: each adapter is one segment
        chosen.sort(key=lambda item: -1 if item[0].adapter_id is None else item[0].adapter_id)
        used = sorted({s.adapter_id for s, _ in chosen if s.adapter_id is not None})
        index = {adapter_id: i for i, adapter_id in enumerate(used)}
        new_seqs = []
        for seq, query_len in chosen:
            needed = -(-(seq.num_cached + query_len) // self.page_size)
            while len(seq.pages) < needed:
                seq.pages.append(self.free_pages.pop())
            if not seq.started:
                seq.started = True
                new_seqs.append(
                    NewSeq(seq_id=seq.seq_id, params=self.params, prompt_ids=tuple(seq.prompt))
                )
        plan = StepPlan(
            step_id=StepId(self.num_steps),
            new_seqs=tuple(new_seqs),
            freed_seq_ids=tuple(freed),
            seq_ids=tuple(s.seq_id for s, _ in chosen),
            input_ids=tuple(
                t
                for s, n in chosen
                for t in ([0] if s.num_pending else s.tokens[s.num_cached : s.num_cached + n])
            ),
            query_lens=tuple(n for _, n in chosen),
            context_lens=tuple(s.num_cached for s, _ in chosen),
            block_tables=tuple(tuple(BlockId(p) for p in s.pages) for s, _ in chosen),
            lora_adapters=tuple(
                -1 if s.adapter_id is None else index[s.adapter_id] for s, _ in chosen
            ),
            adapters=tuple(AdapterRows(a, self.adapter_rows[a]) for a in used),
            uploads=tuple(self.pending_uploads),
            sample_rows=tuple(s.num_cached + n == s.num_tokens for s, n in chosen),
            device_inputs=tuple(s.num_pending > 0 for s, _ in chosen)
            if any(s.num_pending for s, _ in chosen)
            else (),
        )
        self.pending_uploads = []
        return plan, [s for s, _ in chosen]

    def _launch(self, plan: StepPlan, rows: list[_Seq]) -> Any:
        """Launch `plan` and commit it: its tokens computed, its sampled rows' tokens pending."""
        sampled = [s for s, is_sampled in zip(rows, plan.sample_rows, strict=True) if is_sampled]
        first = [s for s in sampled if not s.output and not s.num_pending]
        if self.record_logits and first:
            logits = self.runner.forward(plan)  # K/V writes are idempotent: step rewrites them
            for seq, row in zip(sampled, logits, strict=True):
                if seq in first:
                    self.first_logits.setdefault(seq.seq_id, row.clone())
            plan = msgspec.structs.replace(plan, uploads=())  # forward() already wrote them
        self.num_device_inputs += sum(plan.device_inputs)
        pending = self.runner.launch(plan)
        self.num_steps += 1
        for seq, n in zip(rows, plan.query_lens, strict=True):
            seq.num_cached += n
        for seq in sampled:
            seq.num_pending += 1
        return pending

    def _read(self, plan: StepPlan, rows: list[_Seq], result: Any) -> None:
        """A launched step's tokens, read back."""
        sampled = [s for s, is_sampled in zip(rows, plan.sample_rows, strict=True) if is_sampled]
        for seq, token in zip(sampled, result.token_ids, strict=True):
            seq.num_pending -= 1
            seq.output.append(token)
        if result.logprobs:
            for seq, logprob in zip(sampled, result.logprobs, strict=True):
                seq.logprobs.append(logprob)
