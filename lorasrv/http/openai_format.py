"""Engine output deltas -> OpenAI response objects: per-choice accumulation, usage, logprobs in
the legacy completions format and in the chat format. No I/O; token strings come from `decode`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lorasrv.engine.hf_tokenizer import Detokenizer
from lorasrv.engine.results import ResultBuilder
from lorasrv.http.openai_schemas import (
    ChoiceLogprobs,
    CompletionLogprobs,
    PromptTokensDetails,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from lorasrv.messages import TokenLogprob

Decode = Callable[[Sequence[int]], list[str]]


def token_strings(tokenizer: Detokenizer) -> Decode:
    """Each id's own text, special tokens kept: the `token` of OpenAI logprobs."""

    def decode(ids: Sequence[int]) -> list[str]:
        return [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in ids]

    return decode


@dataclass(slots=True)
class ChoiceState(ResultBuilder):
    """One choice (one engine request): what it produced so far, and where its legacy
    logprobs' `text_offset` stands. NOTE: the engine's "stop" (EOS, stop token or string) and
    "length" are OpenAI's finish reasons as they are."""

    index: int = 0
    num_offset_chars: int = 0  # legacy logprobs: text_offset of the next token


def usage_of(states: Sequence[ChoiceState], n: int) -> Usage:
    """Each prompt's tokens count once (choices i*n .. i*n+n-1 share prompt i); outputs add up.
    A prompt's cached tokens are those none of its choices computed (the least of theirs)."""
    prompt = sum(state.prompt_tokens for state in states if state.index % n == 0)
    completion = sum(state.completion_tokens for state in states)
    cached: dict[int, int] = {}
    for state in states:
        group = state.index // n
        cached[group] = min(cached.get(group, state.cached_tokens), state.cached_tokens)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())),
    )  # fmt: skip


def completion_logprobs(
    decode: Decode,
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    tops: Sequence[tuple[TokenLogprob, ...]],
    num_top: int,
    state: ChoiceState,
) -> CompletionLogprobs:
    """Legacy format for `token_ids` (a whole choice or one streamed delta of it)."""
    tokens = decode(token_ids)
    top_lists = _top_lists(tops, len(token_ids), num_top)
    top_strings = decode([t.token_id for top in top_lists for t in top])
    offsets = []
    for token in tokens:
        offsets.append(state.num_offset_chars)
        state.num_offset_chars += len(token)
    top_dicts: list[dict[str, float]] = []
    at = 0
    for top in top_lists:
        top_dicts.append({top_strings[at + j]: t.logprob for j, t in enumerate(top)})
        at += len(top)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[_logprob(logprobs, i) for i in range(len(tokens))],
        top_logprobs=top_dicts,
        text_offset=offsets,
    )


def chat_logprobs(
    decode: Decode,
    token_ids: Sequence[int],
    logprobs: Sequence[float],
    tops: Sequence[tuple[TokenLogprob, ...]],
    num_top: int,
) -> ChoiceLogprobs:
    tokens = decode(token_ids)
    top_lists = _top_lists(tops, len(token_ids), num_top)
    top_strings = decode([t.token_id for top in top_lists for t in top])
    entries = []
    at = 0
    for i, token in enumerate(tokens):
        top = [
            TopLogprob(
                token=top_strings[at + j], logprob=t.logprob, bytes=_bytes(top_strings[at + j])
            )
            for j, t in enumerate(top_lists[i])
        ]
        at += len(top_lists[i])
        logprob = _logprob(logprobs, i)
        entries.append(
            TokenLogprobEntry(
                token=token,
                logprob=-9999.0 if logprob is None else logprob,  # OpenAI's "unknown"
                bytes=_bytes(token),
                top_logprobs=top,
            )
        )
    return ChoiceLogprobs(content=entries)


def _top_lists(
    tops: Sequence[tuple[TokenLogprob, ...]], num_tokens: int, num_top: int
) -> list[tuple[TokenLogprob, ...]]:
    return [tops[i][:num_top] if i < len(tops) else () for i in range(num_tokens)]


def _logprob(logprobs: Sequence[float], index: int) -> float | None:
    return logprobs[index] if index < len(logprobs) else None


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))
