"""TokenizerActor: encodes prompts (chat template for chat requests), detokenizes incrementally,
applies stop strings, and hands output deltas to the request's output queue. Never sees tensors.

Long prompts are encoded on the actor's own worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, assert_never

from lorasrv.engine.actor import Actor, Sender
from lorasrv.engine.hf_tokenizer import Detokenizer, DetokenizerStream, find_stop, holdback
from lorasrv.engine.outputs import OutputSink
from lorasrv.ids import RequestId
from lorasrv.messages import (
    Abort,
    EmitTokens,
    Enqueue,
    RequestFailed,
    RequestOutput,
    SamplingParams,
    SchedulerInbox,
    Tokenize,
    Tokenized,
    TokenizerInbox,
)

logger = logging.getLogger(__name__)

# Prompts up to this many characters encode inline (well under a millisecond); longer ones go to
# a worker thread (the tokenizers library releases the GIL while it encodes).
INLINE_ENCODE_CHARS: Final = 4096
ENCODE_THREADS: Final = 2


@dataclass(slots=True)
class _Stream:
    params: SamplingParams
    text_stream: DetokenizerStream
    text: str = ""  # everything decoded so far (truncated at a stop string)
    num_emitted_chars: int = 0
    num_tokens: int = 0
    prompt_tokens: int = 0


class TokenizerActor(Actor[TokenizerInbox]):
    name = "tokenizer"

    def __init__(
        self,
        *,
        tokenizer: Detokenizer,
        scheduler: Sender[SchedulerInbox],
        outputs: OutputSink,
        vocab_size: int,
    ) -> None:
        super().__init__()
        self._tokenizer = tokenizer
        self._scheduler = scheduler
        self._outputs = outputs
        self._vocab_size = vocab_size
        self._streams: dict[RequestId, _Stream] = {}
        self._encoding: dict[RequestId, Tokenize] = {}  # sent to a worker thread, not back yet
        self._pool: ThreadPoolExecutor | None = None

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    def handle(self, msg: TokenizerInbox) -> None:
        match msg:
            case Tokenize():
                if prompt_chars(msg) <= INLINE_ENCODE_CHARS:
                    self._encoded(msg, *self._try_encode(msg))
                else:
                    self._encode_in_thread(msg)
            case Tokenized():
                pending = self._encoding.pop(msg.request_id, None)
                if pending is not None:  # else aborted while it was encoding
                    self._encoded(pending, list(msg.prompt_ids), msg.error)
            case EmitTokens():
                self._emit(msg)
            case RequestFailed():
                self._fail(msg.request_id, msg.code, msg.detail)
            case Abort(request_id=request_id):
                # Forwarded through this inbox so it can never overtake the request's Enqueue.
                self._streams.pop(request_id, None)
                self._encoding.pop(request_id, None)
                self._scheduler.send(msg)
            case _:
                assert_never(msg)

    def _encode_in_thread(self, msg: Tokenize) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="lorasrv-encode")
        self._encoding[msg.request_id] = msg
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._try_encode, msg)

        def done(f: asyncio.Future[tuple[list[int], str | None]]) -> None:
            if f.cancelled():
                return  # the actor is stopping
            try:
                ids, error = f.result()
            except Exception as exc:  # a tokenizer bug fails this request, not the server
                logger.exception("request %s: encoding failed", msg.request_id)
                ids, error = [], f"the tokenizer failed on this prompt ({type(exc).__name__})"
            self.send(Tokenized(request_id=msg.request_id, prompt_ids=tuple(ids), error=error))

        future.add_done_callback(done)

    def _try_encode(self, msg: Tokenize) -> tuple[list[int], str | None]:
        """(ids, None), or ([], why the prompt is refused). Thread-safe: reads the tokenizer."""
        try:
            return self._encode(msg), None
        except ValueError as exc:
            return [], str(exc)

    def _encoded(self, msg: Tokenize, prompt_ids: list[int], error: str | None) -> None:
        if error is not None:
            self._fail(msg.request_id, "invalid_request", error, known=False)
            return
        stream = _Stream(
            params=msg.params,
            text_stream=self._tokenizer.new_stream(prompt_ids, msg.params.skip_special_tokens),
            prompt_tokens=len(prompt_ids),
        )
        self._streams[msg.request_id] = stream
        self._scheduler.send(
            Enqueue(
                request_id=msg.request_id,
                prompt_ids=tuple(prompt_ids),
                lora_name=msg.lora_name,
                params=msg.params,
                arrival_s=msg.arrival_s,
            )
        )

    def _encode(self, msg: Tokenize) -> list[int]:
        if msg.messages is not None:
            # The template writes BOS itself, as transformers' apply_chat_template(tokenize=True).
            text = self._tokenizer.apply_chat_template(msg.messages, add_generation_prompt=True)
            ids = self._tokenizer.encode(text, add_special_tokens=False)
        elif msg.text is not None:
            ids = self._tokenizer.encode(msg.text)
        else:
            return list(msg.input_ids or ())  # checked by Engine.submit
        # What the tokenizer made of the text (the request itself was checked by Engine.submit).
        if not ids:
            raise ValueError("the text encodes to no tokens: give a prompt with some content")
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(
                f"the tokenizer produced token id {bad[0]}, outside the model's vocabulary "
                f"[0, {self._vocab_size}): the tokenizer does not match the model"
            )
        return ids

    def _emit(self, msg: EmitTokens) -> None:
        stream = self._streams.get(msg.request_id)
        if stream is None:
            return  # finished by a stop string, or aborted
        stream.num_tokens += len(msg.token_ids)
        finish_reason, matched = msg.finish_reason, msg.matched_stop
        matched_text: str | None = None
        if msg.token_ids:
            search_from = len(stream.text)
            stream.text += stream.text_stream.step(list(msg.token_ids))
            if stream.params.stop:
                at = find_stop(stream.text, stream.params.stop, search_from)
                if at is not None:
                    matched_text = next(
                        s for s in stream.params.stop if stream.text.startswith(s, at)
                    )
                    stream.text = stream.text[:at]
                    if finish_reason is None:
                        self._scheduler.send(Abort(request_id=msg.request_id))
                    finish_reason = "stop"
        finished = finish_reason is not None
        if finished and matched_text is None:
            stream.text += stream.text_stream.flush()
        # Hold back a tail that could still grow into a stop string.
        end = len(stream.text)
        if not finished:
            end -= holdback(stream.text, stream.params.stop)
        delta = stream.text[stream.num_emitted_chars : end]
        stream.num_emitted_chars = max(stream.num_emitted_chars, end)
        self._outputs.put_output(
            RequestOutput(
                request_id=msg.request_id,
                text=delta,
                token_ids=msg.token_ids,
                logprobs=msg.logprobs,
                top_logprobs=msg.top_logprobs,
                finished=finished,
                finish_reason=finish_reason,
                matched_stop=matched_text if matched_text is not None else matched,
                prompt_tokens=stream.prompt_tokens,
                completion_tokens=stream.num_tokens,
                cached_tokens=msg.cached_tokens,
            )
        )
        if finished:
            del self._streams[msg.request_id]

    def _fail(self, request_id: RequestId, code: str, detail: str, known: bool = True) -> None:
        if known:
            self._streams.pop(request_id, None)
        self._outputs.put_output(
            RequestOutput(
                request_id=request_id,
                text="",
                token_ids=(),
                finished=True,
                finish_reason="error",
                error_code=code,
                error_detail=detail,
            )
        )


def prompt_chars(msg: Tokenize) -> int:
    """Characters of text to encode (a chat's message contents; 0 for token ids)."""
    if msg.messages is not None:
        return sum(len(m.content) for m in msg.messages)
    return len(msg.text) if msg.text is not None else 0
