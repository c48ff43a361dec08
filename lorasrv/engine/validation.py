"""Request checks the type system cannot express: the prompt, ranges, lengths, vocabulary. Pure.

The one place a submission's values are checked, whatever wire format it came in (SGLang, OpenAI,
an embedding app): `Engine.submit` calls `check_submission`. Each failure is a BadRequest whose
message names the field, so clients can fix the call. Shapes (types, which fields exist) are the
wire schemas' business, in `lorasrv.http`.
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple

from lorasrv.engine.requests import Submission
from lorasrv.errors import BadRequest, PromptTooLong
from lorasrv.messages import SamplingParams

MAX_TOP_LOGPROBS: Final = 20
MAX_STOP_STRINGS: Final = 32
EMPTY_PROMPT: Final = "the prompt is empty: give non-empty text or input_ids"


class Limits(NamedTuple):
    """What the running engine allows: measured at startup, or set by config."""

    vocab_size: int
    context_length: int
    lora_enabled: bool
    max_token_chars: int  # the tokenizer's bound on characters per token


def check_submission(sub: Submission, limits: Limits) -> None:
    prompts = [p for p in (sub.text, sub.input_ids, sub.messages) if p is not None]
    _require(len(prompts) == 1, "give exactly one of text, input_ids or messages")
    _require(len(prompts[0]) > 0, EMPTY_PROMPT if sub.messages is None else "messages is empty")
    check_prompt_size(sub, limits)
    if sub.input_ids is not None:
        bad = [i for i in sub.input_ids if not 0 <= i < limits.vocab_size]
        if bad:
            raise BadRequest(
                f"input_ids: token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})"
            )
    if sub.lora_name is not None and not limits.lora_enabled:
        raise BadRequest(
            f"adapter {sub.lora_name!r} requested, but LoRA is not enabled on this server "
            "(start it with --enable-lora or --lora-paths)"
        )
    check_sampling(sub.params, vocab_size=limits.vocab_size, context_length=limits.context_length)


def check_prompt_size(sub: Submission, limits: Limits) -> None:
    """Refuse what cannot fit the context before anything tokenizes it: token ids by count, text
    by characters (a token stands for at most `max_token_chars` of them)."""
    context = limits.context_length
    if sub.input_ids is not None and len(sub.input_ids) >= context:
        raise PromptTooLong(
            f"the prompt has {len(sub.input_ids)} tokens; the context length is {context} "
            "(prompt plus at least one new token)"
        )
    chars = len(sub.text or "") + sum(len(m.content) for m in sub.messages or ())
    max_chars = context * limits.max_token_chars
    if chars > max_chars:
        raise PromptTooLong(
            f"the prompt has {chars} characters; at most {max_chars} can fit the context "
            f"length of {context} tokens (this tokenizer: <= {limits.max_token_chars} "
            "characters per token)"
        )


def check_sampling(params: SamplingParams, *, vocab_size: int, context_length: int) -> None:
    _require(
        params.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {params.max_new_tokens}"
    )
    _require(
        params.max_new_tokens <= context_length,
        f"max_new_tokens {params.max_new_tokens} exceeds the context length {context_length}",
    )
    _require(
        math.isfinite(params.temperature) and params.temperature >= 0,
        f"temperature must be >= 0, got {params.temperature}",
    )
    _require(0 < params.top_p <= 1, f"top_p must be in (0, 1], got {params.top_p}")
    _require(params.top_k == -1 or params.top_k >= 0, f"top_k must be -1 or >= 0: {params.top_k}")
    _require(0 <= params.min_p <= 1, f"min_p must be in [0, 1], got {params.min_p}")
    _require(
        math.isfinite(params.repetition_penalty) and params.repetition_penalty > 0,
        f"repetition_penalty must be > 0, got {params.repetition_penalty}",
    )
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(params, name)
        _require(-2 <= value <= 2, f"{name} must be in [-2, 2], got {value}")
    _require(
        0 <= params.top_logprobs <= MAX_TOP_LOGPROBS,
        f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}",
    )
    _require(len(params.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings")
    _require(all(params.stop), "stop strings must be non-empty")
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    _require(not bad, f"stop_token_ids: {bad[:1]} outside the vocabulary [0, {vocab_size})")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise BadRequest(message)
