"""One engine request per OpenAI choice: their submissions, then their outputs consumed together,
collected for a plain answer or as SSE chunks. The caller aborts every request still out.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple

import msgspec
from aiohttp import web

from lorasrv.engine.engine import Engine
from lorasrv.engine.request_handle import RequestHandle
from lorasrv.engine.requests import Submission
from lorasrv.errors import LorasrvError
from lorasrv.http.openai_format import (
    ChoiceState,
    chat_logprobs,
    completion_logprobs,
    token_strings,
    usage_of,
)
from lorasrv.http.openai_schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    Usage,
)
from lorasrv.http.outputs import merged
from lorasrv.http.responses import openai_error_body
from lorasrv.http.sse import DONE_EVENT, SSE_HEADERS
from lorasrv.messages import RequestOutput

log = logging.getLogger(__name__)


class Job(NamedTuple):
    """One OpenAI request as the answering code needs it."""

    id: str
    created: int
    model: str
    loras: tuple[str | None, ...]  # per prompt (logs)
    n: int
    seed: int | None
    is_chat: bool
    stream: bool
    num_top: int | None  # None: no logprobs; else the top-N alternatives per token
    include_usage: bool
    continuous_usage: bool


def submissions(job: Job, prompts: Sequence[Submission]) -> list[Submission]:
    """Choice p*n+i is prompt p's i-th sample, request id `<job id>-<index>`, seed `seed + i`."""
    out = []
    for p, prompt in enumerate(prompts):
        for i in range(job.n):
            params = prompt.params
            if job.seed is not None and i:
                params = msgspec.structs.replace(params, seed=job.seed + i)
            request_id = f"{job.id}-{p * job.n + i}"
            out.append(msgspec.structs.replace(prompt, params=params, request_id=request_id))
    return out


async def collect(handles: Sequence[RequestHandle]) -> list[ChoiceState]:
    states = [ChoiceState(handle.request_id, index=i) for i, handle in enumerate(handles)]
    async with contextlib.aclosing(merged(handles)) as outputs:
        async for index, out in outputs:
            states[index].add(out)
    return states


# ----------------------------------------------------------------------------- SSE


async def stream_choices(
    request: web.Request, engine: Engine, job: Job, handles: Sequence[RequestHandle]
) -> tuple[list[ChoiceState], web.StreamResponse]:
    """SSE chunks, `data: [DONE]` last. The first output is awaited before the response starts,
    so early errors (unknown adapter, prompt too long) keep their HTTP status.
    """
    states = [ChoiceState(handle.request_id, index=i) for i, handle in enumerate(handles)]
    async with contextlib.aclosing(merged(handles)) as outputs:
        first = await anext(outputs, None)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            await _pump(response, engine, job, states, first, outputs)
        except ConnectionResetError:
            log.info("%s: client disconnected mid-stream", job.id)
    return states, response


async def _pump(
    response: web.StreamResponse,
    engine: Engine,
    job: Job,
    states: list[ChoiceState],
    first: tuple[int, RequestOutput] | None,
    outputs: AsyncIterator[tuple[int, RequestOutput]],
) -> None:
    try:
        if job.is_chat:
            for state in states:
                role = ChatDelta(role="assistant", content="")
                await _send(response, _chat_chunk(job, state.index, role))
        if first is not None:
            await _send_delta(response, engine, job, states, *first)
        async for index, out in outputs:
            await _send_delta(response, engine, job, states, index, out)
        if job.include_usage:
            await _send(response, _usage_chunk(job, states))
    except ConnectionResetError:
        raise
    except LorasrvError as exc:
        log.info("%s failed mid-stream: %s %s", job.id, exc.code, exc)
        await _send(response, openai_error_body(exc.detail, exc.status, exc.code))
    except Exception:
        log.exception("%s failed mid-stream", job.id)
        await _send(response, openai_error_body("internal server error", 500, "internal_error"))
    await response.write(DONE_EVENT)


async def _send_delta(
    response: web.StreamResponse,
    engine: Engine,
    job: Job,
    states: list[ChoiceState],
    index: int,
    out: RequestOutput,
) -> None:
    state = states[index]
    state.add(out)
    finish = state.finish_reason if out.finished else None
    wants_logprobs = job.num_top is not None and bool(out.token_ids)
    if not out.text and finish is None and not wants_logprobs:
        return  # text held back (a possible stop string) and nothing else to say
    usage = usage_of(states, job.n) if job.continuous_usage else None
    chunk: Completion | ChatCompletionChunk
    if job.is_chat:
        logprobs = None
        if job.num_top is not None:
            decode = token_strings(engine.tokenizer)
            logprobs = chat_logprobs(
                decode, out.token_ids, out.logprobs, out.top_logprobs, job.num_top
            )
        delta = ChatDelta(content=out.text) if out.text else ChatDelta()
        chunk = _chat_chunk(job, index, delta, logprobs, finish, usage)
    else:
        legacy = None
        if job.num_top is not None:
            decode = token_strings(engine.tokenizer)
            legacy = completion_logprobs(
                decode, out.token_ids, out.logprobs, out.top_logprobs, job.num_top, state
            )
        choice = CompletionChoice(index=index, text=out.text, logprobs=legacy, finish_reason=finish)
        chunk = _completion_chunk(job, [choice], usage)
    await _send(response, chunk)


def _chat_chunk(
    job: Job,
    index: int,
    delta: ChatDelta,
    logprobs: ChoiceLogprobs | None = None,
    finish: str | None = None,
    usage: Usage | None = None,
) -> ChatCompletionChunk:
    choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
    return ChatCompletionChunk(
        id=job.id, created=job.created, model=job.model, choices=[choice], usage=usage
    )


def _completion_chunk(job: Job, choices: list[CompletionChoice], usage: Usage | None) -> Completion:
    return Completion(
        id=job.id, object="text_completion", created=job.created, model=job.model,
        choices=choices, usage=usage,
    )  # fmt: skip


def _usage_chunk(job: Job, states: list[ChoiceState]) -> Completion | ChatCompletionChunk:
    """`stream_options.include_usage`: a last chunk with no choices and the exact usage."""
    usage = usage_of(states, job.n)
    if job.is_chat:
        return ChatCompletionChunk(
            id=job.id, created=job.created, model=job.model, choices=[], usage=usage
        )
    return _completion_chunk(job, [], usage)


async def _send(response: web.StreamResponse, payload: object) -> None:
    await response.write(b"data: " + msgspec.json.encode(payload) + b"\n\n")
