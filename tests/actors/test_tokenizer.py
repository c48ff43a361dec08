"""TokenizerActor driven through its inbox with a recording scheduler and output sink: stop strings
end the request here, so the actor itself must tell the scheduler to abort the sequence."""

from __future__ import annotations

from typing import Any

from lorasrv.engine.tokenizer import TokenizerActor
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
