"""One engine request per OpenAI choice: submit them, then consume them together, collected for a
plain answer or as SSE chunks. Closing or cancelling the consumer aborts every request still out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from lorasrv.errors import LorasrvError
from lorasrv.http.openai_format import ChoiceState, chat_logprobs, completion_logprobs, usage_of
from lorasrv.http.openai_schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    Usage,
)
from lorasrv.http.responses import openai_error_body
from lorasrv.http.sse import DONE_EVENT, SSE_HEADERS
from lorasrv.http.state import EngineLike, RequestHandleLike
from lorasrv.messages import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class Job(NamedTuple):
    """One OpenAI request as the answering code needs it."""

    id: str
    created: int
    model: str
    lora_name: str | None
    n: int
    seed: int | None
    is_chat: bool
    stream: bool
    num_top: int | None  # None: no logprobs; else the top-N alternatives per token
    include_usage: bool
    continuous_usage: bool


def submit_all(
    engine: EngineLike, job: Job, prompts: Sequence[dict[str, Any]], params: SamplingParams
) -> list[RequestHandleLike]:
    """Choice p*n+i is prompt p's i-th sample, request id `<job id>-<index>`, seed `seed + i`."""
    handles: list[RequestHandleLike] = []
    try:
        for p, prompt in enumerate(prompts):
            for i in range(job.n):
                seeded = params
                if job.seed is not None and i:
                    seeded = msgspec.structs.replace(params, seed=job.seed + i)
                handles.append(
                    engine.submit(
                        params=seeded,
                        lora_name=job.lora_name,
                        request_id=f"{job.id}-{p * job.n + i}",
                        **prompt,
                    )
                )
    except BaseException:
        for handle in handles:
            handle.abort()
        raise
    return handles


async def collect(handles: Sequence[RequestHandleLike], num: int) -> list[ChoiceState]:
    states = [ChoiceState(index=i) for i in range(num)]
    async with contextlib.aclosing(merged(handles)) as outputs:
        async for index, out in outputs:
            states[index].add(out)
    return states


async def merged(
    handles: Sequence[RequestHandleLike],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Every handle's outputs as they arrive, tagged with the handle's index; raises the first
    request error. NOTE: at most one `__anext__` per handle is in flight, so order per choice holds.
    """
    pending = {asyncio.ensure_future(_next(handle)): i for i, handle in enumerate(handles)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                out = task.result()
                if out is not None:
                    pending[asyncio.ensure_future(_next(handles[index]))] = index
                    yield index, out
    finally:
        for task in pending:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a second failure is not worth a warning
            task.cancel()
        if pending:
            await asyncio.wait(pending)


async def _next(handle: RequestHandleLike) -> RequestOutput | None:
    try:
        return await handle.__anext__()
    except StopAsyncIteration:
        return None


# ----------------------------------------------------------------------------- SSE


async def stream_choices(
    request: web.Request, engine: EngineLike, job: Job, handles: Sequence[RequestHandleLike]
) -> tuple[list[ChoiceState], web.StreamResponse]:
    """SSE chunks, `data: [DONE]` last. The first output is awaited before the response starts,
    so early errors (unknown adapter, prompt too long) keep their HTTP status.
    """
    states = [ChoiceState(index=i) for i in range(len(handles))]
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
    engine: EngineLike,
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
    engine: EngineLike,
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
            logprobs = chat_logprobs(
                engine.decode_tokens, out.token_ids, out.logprobs, out.top_logprobs, job.num_top
            )
        delta = ChatDelta(content=out.text) if out.text else ChatDelta()
        chunk = _chat_chunk(job, index, delta, logprobs, finish, usage)
    else:
        legacy = None
        if job.num_top is not None:
            legacy = completion_logprobs(
                engine.decode_tokens, out.token_ids, out.logprobs, out.top_logprobs,
                job.num_top, state,
            )  # fmt: skip
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
