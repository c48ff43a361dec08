"""TokenizerActor driven through its inbox with a recording scheduler and output sink: stop strings
end the request here, so the actor itself must tell the scheduler to abort the sequence."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from lorasrv.engine.tokenizer import INLINE_ENCODE_CHARS, TokenizerActor
from lorasrv.ids import RequestId
from lorasrv.messages import Abort, EmitTokens, Enqueue, RequestOutput, SamplingParams, Tokenize
from tests.fakes import FAKE_VOCAB, FakeTokenizer

RID = RequestId("r1")


class Recorder:
    def __init__(self) -> None:
        self.msgs: list[Any] = []

    def send(self, msg: object, /) -> None:
        self.msgs.append(msg)

    def put_output(self, output: RequestOutput) -> None:
        self.msgs.append(output)


def started(stop: tuple[str, ...]) -> tuple[TokenizerActor, Recorder, Recorder]:
    scheduler, outputs = Recorder(), Recorder()
    actor = TokenizerActor(
        tokenizer=FakeTokenizer(), scheduler=scheduler, outputs=outputs, vocab_size=FAKE_VOCAB
    )
    params = SamplingParams(max_new_tokens=50, stop=stop)
    actor.handle(Tokenize(request_id=RID, text="hi", params=params, arrival_s=0.0))
    (enqueue,) = scheduler.msgs
    assert isinstance(enqueue, Enqueue)
    assert enqueue.prompt_ids == (ord("h"), ord("i"))
    scheduler.msgs.clear()
    return actor, scheduler, outputs


def emit(text: str, finish_reason: str | None = None) -> EmitTokens:
    ids = tuple(ord(c) for c in text)
    return EmitTokens(request_id=RID, token_ids=ids, finish_reason=finish_reason)


def test_a_stop_string_match_aborts_the_sequence_once() -> None:
    actor, scheduler, outputs = started(stop=("XY",))
    actor.handle(emit("abX"))
    assert scheduler.msgs == []  # "X" may still grow into "XY": held back, nothing to stop yet
    actor.handle(emit("Yz"))
    assert scheduler.msgs == [Abort(request_id=RID)]
    last = outputs.msgs[-1]
    assert (last.finished, last.finish_reason, last.matched_stop) == (True, "stop", "XY")
    assert "".join(out.text for out in outputs.msgs) == "ab"
    actor.handle(emit("more"))  # tokens of a step already in flight: ignored, no second abort
    assert scheduler.msgs == [Abort(request_id=RID)]
    assert len(outputs.msgs) == 2


def test_a_stop_string_in_the_last_token_needs_no_abort() -> None:
    actor, scheduler, outputs = started(stop=("XY",))
    actor.handle(emit("aXY", finish_reason="length"))  # the scheduler already ended it
    assert scheduler.msgs == []
    last = outputs.msgs[-1]
    assert (last.text, last.finish_reason, last.matched_stop) == ("a", "stop", "XY")


def test_without_stop_strings_nothing_is_held_back() -> None:
    actor, scheduler, outputs = started(stop=())
    actor.handle(emit("XY"))
    actor.handle(emit("!", finish_reason="length"))
    assert scheduler.msgs == []
    assert [out.text for out in outputs.msgs] == ["XY", "!"]
    assert outputs.msgs[-1].finish_reason == "length"


class GatedTokenizer(FakeTokenizer):
    """Long prompts wait for `gate` inside encode, as a slow tokenizer would."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.threads: list[str] = []
        self.finished = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > INLINE_ENCODE_CHARS:
            self.threads.append(threading.current_thread().name)
            assert self.gate.wait(5)
            self.finished += 1
        return super().encode(text, add_special_tokens)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(2):
        while not condition():
            await asyncio.sleep(0.005)


def tokenize(rid: str, text: str) -> Tokenize:
    return Tokenize(request_id=RequestId(rid), text=text, params=SamplingParams(), arrival_s=0.0)


async def test_long_prompts_encode_off_the_event_loop() -> None:
    tokenizer, scheduler, outputs = GatedTokenizer(), Recorder(), Recorder()
    actor = TokenizerActor(
        tokenizer=tokenizer, scheduler=scheduler, outputs=outputs, vocab_size=FAKE_VOCAB
    )
    task = asyncio.create_task(actor.run())
    long = "a" * (INLINE_ENCODE_CHARS + 1)
    actor.send(tokenize("long", long))
    actor.send(tokenize("short", "hi"))
    await until(lambda: len(scheduler.msgs) == 1)
    assert scheduler.msgs[0].request_id == "short"  # not stuck behind the long one
    assert tokenizer.threads[0].startswith("lorasrv-encode")
    tokenizer.gate.set()
    await until(lambda: len(scheduler.msgs) == 2)
    assert scheduler.msgs[1].request_id == "long"
    assert len(scheduler.msgs[1].prompt_ids) == len(long)

    # Aborted while it encodes: the scheduler never sees it.
    tokenizer.gate.clear()
    actor.send(tokenize("gone", long))
    await until(lambda: len(tokenizer.threads) == 2)
    actor.send(Abort(request_id=RequestId("gone")))
    await until(lambda: len(scheduler.msgs) == 3)
    tokenizer.gate.set()
    await until(lambda: tokenizer.finished == 2 and actor.inbox.empty())
    await asyncio.sleep(0.05)  # the thread's result reached the actor and was dropped
    assert scheduler.msgs[2:] == [Abort(request_id=RequestId("gone"))]

    # A long prompt the model cannot take fails with the tokenizer's reason.
    actor.send(tokenize("bad", "\u00e9" * (INLINE_ENCODE_CHARS + 1)))
    await until(lambda: len(outputs.msgs) == 1)
    assert outputs.msgs[0].error_code == "invalid_request"
    assert "outside the model's vocabulary" in (outputs.msgs[0].error_detail or "")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
