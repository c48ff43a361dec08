"""Sequence: the scheduler's state for one request. Pure; owned by the SchedulerActor only."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lorasrv.engine.prefix_cache import CachedPage
from lorasrv.ids import AdapterId, BlockId, RequestId, SeqId
from lorasrv.messages import EmitTokens, SamplingParams, StepResult


class SeqStatus(enum.Enum):
    ACQUIRING = "acquiring"  # waiting for the adapter manager's reference
    WAITING = "waiting"  # admitted to the queue, holds no pages
    RUNNING = "running"  # holds pages; prefilling or decoding
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    seq_id: SeqId
    request_id: RequestId
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter_id: AdapterId | None = None
    adapter_rank: int = 0  # LoRA rows its adapter holds on the GPU
    is_pinned_adapter: bool = False
    status: SeqStatus = SeqStatus.ACQUIRING
    output_ids: list[int] = field(default_factory=list)  # tokens the host has
    # Tokens sampled by launched steps that have not reached the host yet (the overlap schedule
    # plans a step before the previous one's tokens are back); counted in num_tokens.
    num_pending: int = 0
    num_computed: int = 0  # tokens whose KV is written by launched steps
    blocks: list[BlockId] = field(default_factory=list)
    # The cached pages it holds: the first len(prefix) pages of `blocks` are theirs, unless
    # it computed a page that someone else cached first (then it keeps its own copy).
    prefix: list[CachedPage] = field(default_factory=list)
    cached_tokens: int | None = None  # prompt tokens found cached at its first admission
    num_admissions: int = 0  # a step's row writes for the admission it was planned in
    in_runner: bool = False  # the runner holds sampler state for it
    waiting_since_step: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_decode(self) -> bool:
        """Its next step feeds one token and samples one (the engine's one decode rule)."""
        return self.num_uncomputed == 1 and self.num_computed > 0

    def can_grow(self, context_length: int) -> bool:
        """Another token may follow the ones sampled so far, pending ones included: below
        max_new_tokens and the context. False means its last token is already on its way."""
        num_generated = len(self.output_ids) + self.num_pending
        return num_generated < self.params.max_new_tokens and self.num_tokens < context_length

    def token_slice(self, start: int, stop: int) -> tuple[int, ...]:
        """Tokens [start, stop) of prompt + output (tokens the host has), without building the
        whole list."""
        num_prompt = len(self.prompt_ids)
        if stop <= num_prompt:
            return self.prompt_ids[start:stop]
        if start >= num_prompt:
            return tuple(self.output_ids[start - num_prompt : stop - num_prompt])
        return self.prompt_ids[start:] + tuple(self.output_ids[: stop - num_prompt])


def prompt_problem(
    num_prompt: int, *, context_length: int, page_size: int, max_kv_pages: int
) -> tuple[str, str] | None:
    """(code, detail) when a prompt can never run: longer than the context, or than the KV
    cache can ever hold; None if it fits."""
    if num_prompt >= context_length:
        return (
            "prompt_too_long",
            f"prompt has {num_prompt} tokens; the context length is {context_length} "
            "(prompt plus at least one new token)",
        )
    needed = -(-(num_prompt + 1) // page_size)
    if needed > max_kv_pages:
        return (
            "prompt_too_long",
            f"prompt needs {needed} KV pages; the KV cache has at most {max_kv_pages}",
        )
    return None


def stop_reason(
    seq: Sequence, token_id: int, eos_ids: frozenset[int], context_length: int
) -> tuple[str | None, int | None]:
    """(finish reason, matched stop token) once `token_id` is appended to the host's outputs;
    (None, None) goes on."""
    params = seq.params
    if token_id in params.stop_token_ids:
        return "stop", token_id
    if not params.ignore_eos and token_id in eos_ids:
        return "stop", token_id
    if len(seq.output_ids) >= params.max_new_tokens:
        return "length", None
    if len(seq.prompt_ids) + len(seq.output_ids) >= context_length:  # pending ones aside
        return "length", None
    return None, None


def token_message(
    seq: Sequence, result: StepResult | None, index: int, reason: str | None, matched: int | None
) -> EmitTokens:
    """Row `index` of `result` for the tokenizer (None: no token, only the end `reason`).
    Logprobs only when the request asked: a step computes them for every row once any row
    asks, and what another request asked must not change this one's output."""
    if result is None:
        return EmitTokens(request_id=seq.request_id, token_ids=(), finish_reason=reason,
                          prompt_tokens=len(seq.prompt_ids),
                          cached_tokens=seq.cached_tokens or 0)  # fmt: skip
    params = seq.params
    wants = (params.logprobs or params.top_logprobs > 0) and bool(result.logprobs)
    wants_top = params.top_logprobs > 0 and bool(result.top_logprobs)
    return EmitTokens(
        request_id=seq.request_id,
        token_ids=(result.token_ids[index],),
        logprobs=(result.logprobs[index],) if wants else (),
        top_logprobs=(result.top_logprobs[index],) if wants_top else (),
        finish_reason=reason,
        matched_stop=matched,
        prompt_tokens=len(seq.prompt_ids),
        cached_tokens=seq.cached_tokens or 0,
    )
