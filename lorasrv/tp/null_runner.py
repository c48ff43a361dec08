"""NullRunner: a StepRunner that does no model work, for timing and testing the TP control path.

A TP worker runs it instead of ModelRunner when TpRunner gets `runner_class=NULL_RUNNER`: no
weights, no device, no collectives. Each step answers, on TP rank 0, one token per sampled row
derived from the plan (`expected_tokens`), so a test can tell that a plan arrived; a sequence
added with `top_logprobs = k` also gets k made-up alternatives per step (large results).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorasrv.ids import AdapterId, SeqId
from lorasrv.messages import HostCopyReady, RunnerReady, StepPlan, StepResult, TokenLogprob
from lorasrv.model.arch import read_arch

NULL_RUNNER = "lorasrv.tp.null_runner:NullRunner"


def expected_tokens(plan: StepPlan) -> tuple[int, ...]:
    """Per sampled row: its last input token + its context length + its block table's length
    and last page + its `lora_adapters` entry (cheap, so a bench times the control path)."""
    tokens, start = [], 0
    rows = zip(plan.query_lens, plan.context_lens, plan.block_tables, strict=True)
    for row, (num_new, context, table) in enumerate(rows):
        start += num_new
        if plan.sample_rows[row]:
            lora = plan.lora_adapters[row] if plan.lora_adapters else 0
            tokens.append(plan.input_ids[start - 1] + context + len(table) + table[-1] + lora)
    return tuple(tokens)


def made_up_top_logprobs(num_top: int) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(i, -i / 3) for i in range(num_top))


class NullRunner:
    """ModelRunner's keywords (most ignored); remembers what it was told, for tests."""

    def __init__(
        self,
        *,
        model_path: str,
        page_size: int = 16,
        num_kv_pages: int | None = None,
        tp: Any = None,
        **_: Any,
    ) -> None:
        self.arch = read_arch(model_path)
        self.page_size = page_size
        self.num_kv_pages = num_kv_pages or 1024
        self.is_rank0 = tp is None or tp.rank == 0
        self.host_copies: dict[AdapterId, HostCopyReady] = {}
        self.num_top: dict[SeqId, int] = {}

    def ready(self) -> RunnerReady:
        return RunnerReady(
            num_kv_pages=self.num_kv_pages,
            page_size=self.page_size,
            kv_page_bytes=4096,
            lora_row_bytes=0,
            lora_max_rows=0,
            max_lora_rank=0,
            lora_target_modules=(),
            vocab_size=self.arch.vocab_size,
            context_length=self.arch.max_position_embeddings,
            eos_token_ids=self.arch.eos_token_ids,
            device="cpu",
            dtype="float32",
        )

    def step(self, plan: StepPlan) -> StepResult:
        for seq_id in plan.freed_seq_ids:
            self.num_top.pop(seq_id, None)
        for seq in plan.new_seqs:
            self.num_top[seq.seq_id] = seq.params.top_logprobs
        if not plan.seq_ids or not self.is_rank0:
            return StepResult()
        tokens = expected_tokens(plan)
        sampled = [s for s, yes in zip(plan.seq_ids, plan.sample_rows, strict=True) if yes]
        tops = [self.num_top.get(seq_id, 0) for seq_id in sampled]
        if not any(tops):
            return StepResult(token_ids=tokens)
        return StepResult(
            token_ids=tokens,
            logprobs=tuple(-float(t) for t in tokens),
            top_logprobs=tuple(made_up_top_logprobs(k) for k in tops),
        )

    def add_host_copy(self, copy: HostCopyReady) -> None:
        self.host_copies[copy.adapter_id] = copy

    def drop_host_copy(self, adapter_id: AdapterId) -> None:
        self.host_copies.pop(adapter_id, None)

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """Fails only inside a call, which raises."""

    def shutdown(self) -> None:
        self.host_copies.clear()
