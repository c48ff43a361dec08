"""Request checks the type system cannot express: ranges, lengths, vocabulary. Pure.

Each failure is a BadRequest whose message names the field, so clients can fix the call.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from lorasrv.errors import BadRequest
from lorasrv.messages import SamplingParams

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 32


def to_sampling_params(raw: dict[str, Any] | SamplingParams | None) -> SamplingParams:
    if raw is None:
        return SamplingParams()
    if isinstance(raw, SamplingParams):
        return raw
    if not isinstance(raw, dict):
        raise BadRequest(f"sampling_params must be an object, got {type(raw).__name__}")
    raw = dict(raw)
    stop = raw.get("stop")
    if isinstance(stop, str):
        raw["stop"] = [stop]  # SGLang accepts one string or a list
    try:
        return msgspec.convert(raw, SamplingParams)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"sampling_params: {exc}") from None


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
