"""Dispatcher: grouping by adapter, reassembly, and what a replica's death does to each request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from lorasrv.deploy.ray import dispatch
from lorasrv.deploy.ray.dispatch import MAX_ATTEMPTS, Dispatcher
from lorasrv.deploy.ray.protocol import Tagged
from lorasrv.engine.requests import Submission
from lorasrv.ids import RequestId
from lorasrv.messages import RequestOutput, SamplingParams

TIMEOUT_S = 2


class Gone(Exception):
    pass


class Busy(Exception):
    pass


def sub(rid: str, lora: str | None) -> Submission:
    return Submission(request_id=rid, params=SamplingParams(), text=rid, lora_name=lora)


def delta(rid: str, text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id=RequestId(rid), text=text, token_ids=(1,), finished=finished)


class FakeReplicas:
    """Each call answers its submissions with `<id>:1` then `<id>:2` (finished), unless the
    script for that attempt says to fail after delivering to some indices first."""

    def __init__(self, script: list[tuple[set[int], Exception]] | None = None) -> None:
        self.calls: list[tuple[str | None, list[str], bool]] = []
        self.script = list(script or [])
        self.closed = asyncio.Event()

    async def call(
        self, lora: str | None, subs: list[Submission], stream: bool
    ) -> AsyncIterator[list[Tagged]]:
        self.calls.append((lora, [s.request_id for s in subs], stream))
        try:
            if self.script:
                started, error = self.script.pop(0)
                yield [(i, delta(subs[i].request_id, ":1")) for i in sorted(started)]
                raise error
            yield [(i, delta(s.request_id, ":1")) for i, s in enumerate(subs)]
            await asyncio.sleep(0)
            yield [(i, delta(s.request_id, ":2", True)) for i, s in reversed(list(enumerate(subs)))]
        finally:
            self.closed.set()


def dispatcher(replicas: FakeReplicas) -> Dispatcher:
    return Dispatcher(
        replicas.call,
        is_replica_gone=lambda exc: isinstance(exc, Gone),
        is_overloaded=lambda exc: isinstance(exc, Busy),
    )


async def drain(queue: asyncio.Queue[RequestOutput]) -> list[RequestOutput]:
    outs = [await queue.get()]
    while not outs[-1].finished:
        outs.append(await queue.get())
    return outs


def submit_all(
    d: Dispatcher, items: list[tuple[str, str | None]], stream: bool = True
) -> dict[str, asyncio.Queue[RequestOutput]]:
    queues: dict[str, asyncio.Queue[RequestOutput]] = {}
    for rid, lora in items:
        queues[rid] = asyncio.Queue()
        d.submit(sub(rid, lora), queues[rid], stream)
    return queues


def text(outs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outs)


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "RETRY_DELAY_S", 0.0)


async def test_one_call_per_adapter_and_every_request_gets_its_own_deltas() -> None:
    replicas = FakeReplicas()
    d = dispatcher(replicas)
    async with asyncio.timeout(TIMEOUT_S):
        queues = submit_all(d, [("r0", "a"), ("r1", None), ("r2", "b"), ("r3", "a"), ("r4", None)])
        results = {rid: text(await drain(q)) for rid, q in queues.items()}
    assert results == dict.fromkeys(queues, ":1:2")
    assert sorted(replicas.calls, key=str) == sorted(
        [("a", ["r0", "r3"], True), (None, ["r1", "r4"], True), ("b", ["r2"], True)], key=str
    )


async def test_a_dead_replica_loses_only_the_requests_that_had_started_there() -> None:
    replicas = FakeReplicas(script=[({0}, Gone("replica died"))])
    d = dispatcher(replicas)
    async with asyncio.timeout(TIMEOUT_S):
        queues = submit_all(d, [("started", "a"), ("waiting", "a")])
        started, waiting = await drain(queues["started"]), await drain(queues["waiting"])
    assert started[-1].error_code == "engine_dead"  # 503: it had streamed a delta already
    assert text(waiting) == ":1:2"
    assert replicas.calls == [("a", ["started", "waiting"], True), ("a", ["waiting"], True)]


async def test_a_non_streamed_group_is_sent_again_whole() -> None:
    replicas = FakeReplicas(script=[(set(), Gone("replica died"))] * (MAX_ATTEMPTS - 1))
    d = dispatcher(replicas)
    async with asyncio.timeout(TIMEOUT_S):
        queues = submit_all(d, [("x", None), ("y", None)], stream=False)
        assert [text(await drain(q)) for q in queues.values()] == [":1:2", ":1:2"]
    assert len(replicas.calls) == MAX_ATTEMPTS


async def test_gives_up_after_max_attempts_and_maps_other_failures() -> None:
    replicas = FakeReplicas(script=[(set(), Gone("x"))] * MAX_ATTEMPTS + [(set(), Busy("full"))])
    d = dispatcher(replicas)
    async with asyncio.timeout(TIMEOUT_S):
        gone = await drain(submit_all(d, [("g", "a")])["g"])
        busy = await drain(submit_all(d, [("b", "a")])["b"])
    assert (gone[-1].error_code, busy[-1].error_code) == ("engine_dead", "overloaded")
    assert len(replicas.calls) == MAX_ATTEMPTS + 1


async def test_the_call_is_cancelled_once_every_request_of_its_group_is_aborted() -> None:
    started = asyncio.Event()

    async def endless(
        lora: str | None, subs: list[Submission], stream: bool
    ) -> AsyncIterator[list[Tagged]]:
        try:
            yield [(0, delta(subs[0].request_id, ":1"))]
            started.set()
            await asyncio.Event().wait()
        finally:
            closed.set()

    closed = asyncio.Event()
    d = Dispatcher(endless, is_replica_gone=lambda exc: False)
    async with asyncio.timeout(TIMEOUT_S):
        submit_all(d, [("p", "a"), ("q", "a")])
        await started.wait()
        d.abort("p")
        await asyncio.sleep(0.01)
        assert not closed.is_set()  # q still wants its answer
        d.abort("q")
        await closed.wait()
        d.abort("never-submitted")  # unknown ids are ignored


@pytest.mark.parametrize("stream", [True, False])
async def test_an_abort_before_the_group_leaves_drops_it(stream: bool) -> None:
    replicas = FakeReplicas()
    d = dispatcher(replicas)
    async with asyncio.timeout(TIMEOUT_S):
        queues = submit_all(d, [("gone", "a"), ("kept", "b")], stream)
        d.abort("gone")
        assert text(await drain(queues["kept"])) == ":1:2"
    assert [lora for lora, _, _ in replicas.calls] == ["b"]
    assert not d.in_flight("gone")
