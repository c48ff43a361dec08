"""RequestResult: what one request produced, folded from its output deltas. Pure and typed; the
SGLang and OpenAI response dicts are built from it in `lorasrv.http`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from lorasrv.messages import RequestOutput, TokenLogprob


class RequestResult(msgspec.Struct, frozen=True, kw_only=True):
    """Cumulative text and ids; `finish_reason` is None until the request ends."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()  # one per token when the request asked for logprobs
    top_logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: int | str | None = None  # the stop token id or stop string that ended it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class ResultBuilder:
    """Accumulates one request's deltas (`add`); `result()` is a snapshot of what came so far."""

    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[TokenLogprob, ...]] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        self.top_logprobs.extend(out.top_logprobs)
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.completion_tokens or self.completion_tokens
        self.cached_tokens = out.cached_tokens or self.cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason
            self.matched_stop = out.matched_stop

    def result(self) -> RequestResult:
        return RequestResult(
            request_id=self.request_id,
            text=self.text,
            token_ids=tuple(self.token_ids),
            logprobs=tuple(self.logprobs),
            top_logprobs=tuple(self.top_logprobs),
            finish_reason=self.finish_reason,
            matched_stop=self.matched_stop,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
        )
