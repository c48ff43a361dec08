"""OpenAI routes: /v1/completions and /v1/chat/completions (streaming too), /v1/models/{id}.

Parse and check the body (OpenAI field names in every message), resolve `model` to the base or an
adapter, submit one engine request per choice, then answer at once or stream SSE chunks. Errors
take the OpenAI dialect of `responses.py`; a vanished client aborts every choice's request.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Final, NamedTuple

import msgspec
from aiohttp import web

from lorasrv.engine.engine import Engine
from lorasrv.engine.requests import Submission
from lorasrv.errors import BadRequest, ModelNotFound
from lorasrv.http.handlers import decode_body, model_cards_of
from lorasrv.http.models import adapters_per_prompt, model_adapter
from lorasrv.http.openai_format import (
    ChoiceState,
    chat_logprobs,
    completion_logprobs,
    token_strings,
    usage_of,
)
from lorasrv.http.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageIn,
    Completion,
    CompletionChoice,
    CompletionRequest,
    SamplingFields,
)
from lorasrv.http.openai_stream import Job, collect, stream_choices, submissions
from lorasrv.http.outputs import abort_all, submit_all
from lorasrv.http.responses import json_response
from lorasrv.http.state import ENGINE_KEY
from lorasrv.messages import ChatMessage, SamplingParams

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS: Final = 16  # OpenAI's default for /v1/completions
MAX_CHOICES: Final = 128  # prompts x n in one request
#: OpenAI role -> the role the chat template sees ("developer" is OpenAI's newer "system")
CHAT_ROLES: Final = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}
PROMPT_SHAPE: Final = (
    "prompt must be a string, a list of strings, a list of token ids or a list of such lists"
)


class Prompt(NamedTuple):
    text: str | None = None
    input_ids: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------- routes


async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    body = await decode_body(request, CompletionRequest)
    _check_common(body)
    if body.echo:
        raise BadRequest("echo: returning the prompt is not supported; leave it false")
    if body.suffix:
        raise BadRequest("suffix: insertion is not supported; leave it null")
    if body.best_of is not None and body.best_of != body.n:
        raise BadRequest(f"best_of: only best_of == n is supported, got {body.best_of}")
    prompts = completion_prompts(body.prompt)
    max_tokens = body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
    num_top = body.logprobs
    params = sampling_params(body, max_tokens, num_top is not None, num_top or 0)
    loras = await adapters_per_prompt(engine, body.model, body.lora_path, len(prompts))
    job = _job(body, "cmpl", loras, num_top, is_chat=False)
    bases = [
        Submission(text=p.text, input_ids=p.input_ids, params=params, lora_name=lora)
        for p, lora in zip(prompts, loras, strict=True)
    ]
    return await _answer(request, engine, job, bases)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    body = await decode_body(request, ChatCompletionRequest)
    _check_common(body)
    _check_chat_only(body)
    messages = chat_messages(body.messages)
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs: requires logprobs to be true")
    # No limit given: up to the context length, as OpenAI does.
    max_tokens = body.max_completion_tokens or body.max_tokens or _context_length(engine)
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, body.logprobs, num_top or 0)
    (lora,) = await adapters_per_prompt(engine, body.model, body.lora_path, 1)
    job = _job(body, "chatcmpl", [lora], num_top, is_chat=True)
    base = Submission(messages=tuple(messages), params=params, lora_name=lora)
    return await _answer(request, engine, job, [base])


async def retrieve_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    engine = request.app[ENGINE_KEY]
    lora_name = await model_adapter(engine, model_id)
    wanted = engine.served_model_name if lora_name is None else lora_name
    card = next((card for card in await model_cards_of(request) if card.id == wanted), None)
    if card is None:  # unloaded between the two looks
        raise ModelNotFound(f"The model `{model_id}` does not exist")
    return json_response(msgspec.structs.replace(card, id=model_id))


# ----------------------------------------------------------------------------- answering


async def _answer(
    request: web.Request, engine: Engine, job: Job, prompts: list[Submission]
) -> web.StreamResponse:
    if len(prompts) * job.n > MAX_CHOICES:
        raise BadRequest(f"{len(prompts)} prompts x n={job.n}: at most {MAX_CHOICES} choices")
    started_s = time.monotonic()
    handles = submit_all(engine, submissions(job, prompts))
    try:
        if job.stream:
            states, response = await stream_choices(request, engine, job, handles)
        else:
            states = await collect(handles)
            response = json_response(_final(engine, job, states))
    finally:
        abort_all(handles)  # no-op for finished ones; frees the rest on error or disconnect
    _log_done(job, states, started_s)
    return response


def _final(engine: Engine, job: Job, states: list[ChoiceState]) -> Completion | ChatCompletion:
    usage = usage_of(states, job.n)
    decode = token_strings(engine.tokenizer)
    if job.is_chat:
        return ChatCompletion(
            id=job.id, created=job.created, model=job.model, usage=usage,
            choices=[
                ChatChoice(
                    index=state.index,
                    message=AssistantMessage(content=state.text),
                    logprobs=None if job.num_top is None else chat_logprobs(
                        decode, state.token_ids, state.logprobs, state.top_logprobs, job.num_top,
                    ),
                    finish_reason=state.finish_reason,
                )
                for state in states
            ],
        )  # fmt: skip
    return Completion(
        id=job.id, object="text_completion", created=job.created, model=job.model, usage=usage,
        choices=[
            CompletionChoice(
                index=state.index,
                text=state.text,
                logprobs=None if job.num_top is None else completion_logprobs(
                    decode, state.token_ids, state.logprobs, state.top_logprobs, job.num_top,
                    state,
                ),
                finish_reason=state.finish_reason,
            )
            for state in states
        ],
    )  # fmt: skip


def _log_done(job: Job, states: list[ChoiceState], started_s: float) -> None:
    usage = usage_of(states, job.n)
    log.info(
        "%s %s model=%s adapter=%s choices=%d prompt_tokens=%d completion_tokens=%d "
        "finish=%s %.3f s",
        job.id, "chat" if job.is_chat else "completion", job.model,
        ",".join(sorted({lora or "-" for lora in job.loras})),
        len(states), usage.prompt_tokens, usage.completion_tokens,
        ",".join(sorted({str(state.finish_reason) for state in states})),
        time.monotonic() - started_s,
    )  # fmt: skip


def _job(
    body: SamplingFields,
    prefix: str,
    loras: list[str | None],
    num_top: int | None,
    *,
    is_chat: bool,
) -> Job:
    options = body.stream_options
    return Job(
        id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.model,
        loras=tuple(loras),
        n=body.n,
        seed=body.seed,
        is_chat=is_chat,
        stream=body.stream,
        num_top=num_top,
        include_usage=options is not None and options.include_usage,
        continuous_usage=options is not None and options.continuous_usage_stats,
    )


# ----------------------------------------------------------------------------- parsing


def completion_prompts(prompt: str | list[Any]) -> list[Prompt]:
    if isinstance(prompt, str):
        return [Prompt(text=prompt)]
    if not prompt:
        raise BadRequest("prompt: an empty list; give at least one prompt")
    if all(isinstance(item, str) for item in prompt):
        return [Prompt(text=item) for item in prompt]
    if all(_is_ids(item) for item in prompt):
        return [Prompt(input_ids=tuple(prompt))]
    if all(isinstance(item, list) and all(_is_ids(i) for i in item) for item in prompt):
        return [Prompt(input_ids=tuple(item)) for item in prompt]
    raise BadRequest(PROMPT_SHAPE)


def _is_ids(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_messages(raw: list[ChatMessageIn]) -> list[ChatMessage]:
    if not raw:
        raise BadRequest("messages: give at least one message")
    messages = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        role = CHAT_ROLES.get(message.role)
        if role is None:
            allowed = ", ".join(CHAT_ROLES)
            raise BadRequest(f"{where}.role: {message.role!r} is not supported ({allowed})")
        if message.tool_calls:
            raise BadRequest(f"{where}.tool_calls: tool calling is not supported")
        messages.append(ChatMessage(role=role, content=_content(where, message.content)))
    return messages


def _content(where: str, content: str | list[Any] | None) -> str:
    if content is None:
        raise BadRequest(f"{where}.content: required (a string or a list of text parts)")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise BadRequest(
                f"{where}.content[{j}]: parts of type {part.type!r} are not supported; "
                "this server takes text only"
            )
        if part.text is None:
            raise BadRequest(f"{where}.content[{j}].text: required for a text part")
        texts.append(part.text)
    return "\n".join(texts)


def sampling_params(
    body: SamplingFields, max_tokens: int, logprobs: bool, num_top: int
) -> SamplingParams:
    """OpenAI's fields (and SGLang's extensions) as the engine's; the engine checks the values."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        seed=body.seed,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        skip_special_tokens=body.skip_special_tokens,
        logprobs=logprobs,
        top_logprobs=num_top,
    )


def _context_length(engine: Engine) -> int:
    return engine.ready_info.context_length


def _check_common(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options: only allowed with stream=true")
    if body.logit_bias:
        raise BadRequest("logit_bias: not supported; leave it empty")


def _check_chat_only(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise BadRequest("tools: tool calling is not supported")
    if body.tool_choice not in (None, "none", "auto"):
        raise BadRequest("tool_choice: tool calling is not supported")
    if body.response_format is not None and body.response_format.type != "text":
        raise BadRequest(
            f"response_format: type {body.response_format.type!r} is not supported; use 'text'"
        )
