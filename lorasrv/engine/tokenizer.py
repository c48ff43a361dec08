"""TokenizerActor: encodes prompts (chat template for chat requests), detokenizes incrementally,
applies stop strings, and hands output deltas to the request's output queue. Never sees tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import assert_never

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
    TokenizerInbox,
)

logger = logging.getLogger(__name__)


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

    def handle(self, msg: TokenizerInbox) -> None:
        match msg:
            case Tokenize():
                self._tokenize(msg)
            case EmitTokens():
                self._emit(msg)
            case RequestFailed():
                self._fail(msg.request_id, msg.code, msg.detail)
            case Abort(request_id=request_id):
                # Forwarded through this inbox so it can never overtake the request's Enqueue.
                self._streams.pop(request_id, None)
                self._scheduler.send(msg)
            case _:
                assert_never(msg)

    def _tokenize(self, msg: Tokenize) -> None:
        try:
            prompt_ids = self._encode(msg)
        except ValueError as exc:
            self._fail(msg.request_id, "invalid_request", str(exc), known=False)
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
