"""A request's way: tokenizer -> scheduler -> tokenizer -> the request's output queue."""

import msgspec

from lorasrv.ids import RequestId
from lorasrv.messages.base import ChatMessage, Msg, SamplingParams, TokenLogprob


class Tokenize(Msg, frozen=True, kw_only=True):
    """Engine -> TokenizerActor: one request, as the client gave it."""

    request_id: RequestId
    text: str | None = None
    input_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None  # chat: rendered with the chat template
    lora_name: str | None = None
    params: SamplingParams


class Tokenized(Msg, frozen=True, kw_only=True):
    """TokenizerActor -> itself: a long prompt encoded off the event loop (ids, or why not)."""

    request_id: RequestId
    prompt_ids: tuple[int, ...] = ()
    error: str | None = None


class Enqueue(Msg, frozen=True, kw_only=True):
    """TokenizerActor -> SchedulerActor: a tokenized request ready for admission."""

    request_id: RequestId
    prompt_ids: tuple[int, ...]
    lora_name: str | None
    params: SamplingParams


class Abort(Msg, frozen=True, kw_only=True):
    """Client gone or request finished elsewhere (stop string): free everything it holds."""

    request_id: RequestId


class EmitTokens(Msg, frozen=True, kw_only=True):
    """SchedulerActor -> TokenizerActor: new token ids of one request, maybe its end."""

    request_id: RequestId
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: int | None = None  # the stop token id that ended it
    prompt_tokens: int = 0
    cached_tokens: int = 0


class RequestFailed(Msg, frozen=True, kw_only=True):
    """Any actor -> TokenizerActor (or the engine): the request ends with an error."""

    request_id: RequestId
    code: str  # errors.LorasrvError.code
    detail: str


class RequestOutput(msgspec.Struct, frozen=True, kw_only=True):
    """TokenizerActor -> the request's output queue: a delta of text and ids, maybe the last."""

    request_id: RequestId
    text: str  # new text since the previous output
    token_ids: tuple[int, ...]  # new ids since the previous output
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()
    finished: bool = False
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error_code: str | None = None
    error_detail: str | None = None
