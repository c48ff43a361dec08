"""OpenAI API bodies (completions, chat completions, errors) as msgspec Structs.

Requests reject unknown top-level fields (typos fail loudly); message objects accept OpenAI's extra
fields. Limits of OpenAI's own fields are constraints here, so errors name the field (`$.n`);
sampling values shared with every dialect (temperature, top_p, penalties...) are checked once, by
the engine.
"""

from typing import Annotated, Any

import msgspec

MAX_N = 16
MAX_LOGPROBS = 20

Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NumLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_LOGPROBS)]


class _Request(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class StreamOptions(_Request, frozen=True, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class SamplingFields(_Request, frozen=True, kw_only=True):
    """Fields both endpoints share, SGLang's sampling extensions included."""

    model: str
    max_tokens: PositiveInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: Count = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # SGLang / vLLM extensions
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    lora_path: str | list[str | None] | None = None  # SGLang: one, or one per prompt


class CompletionRequest(SamplingFields, frozen=True, kw_only=True):
    prompt: str | list[Any]  # str, list[str], list[int] or list[list[int]]: checked in openai.py
    logprobs: NumLogprobs | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Count | None = None


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str | None = None


class ChatMessageIn(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    type: str


class ChatCompletionRequest(SamplingFields, frozen=True, kw_only=True):
    messages: list[ChatMessageIn]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


# ----------------------------------------------------------------------------- responses


class PromptTokensDetails(msgspec.Struct, frozen=True, kw_only=True):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(msgspec.Struct, frozen=True, kw_only=True):
    """The legacy completions format: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    system_fingerprint: str | None = None


class TopLogprob(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct, frozen=True, kw_only=True):
    content: list[TokenLogprobEntry] | None


class AssistantMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str = "assistant"
    content: str


class ChatChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletion(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class OpenAIErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None


class OpenAIErrorResponse(msgspec.Struct, frozen=True, kw_only=True):
    error: OpenAIErrorDetail
