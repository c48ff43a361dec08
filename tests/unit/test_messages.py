"""Every message type round-trips through msgpack, so an actor could move to another process."""

from __future__ import annotations

import msgspec
import pytest

from lorasrv import messages as m
from lorasrv.ids import AdapterId, BlockId, OpId, RequestId, SeqId, StepId

PARAMS = m.SamplingParams(max_new_tokens=3, stop=("x",), seed=1)
SAMPLES: list[m.Msg] = [
    m.Tokenize(request_id=RequestId("r"), text="hi", params=PARAMS),
    m.Tokenize(
        request_id=RequestId("r"),
        messages=(m.ChatMessage(role="user", content="hi"),),
        lora_name="a",
        params=PARAMS,
    ),
    m.Tokenized(request_id=RequestId("r"), prompt_ids=(1, 2)),
    m.Tokenized(request_id=RequestId("r"), error="the text encodes to no tokens"),
    m.Enqueue(request_id=RequestId("r"), prompt_ids=(1, 2), lora_name=None, params=PARAMS),
    m.Abort(request_id=RequestId("r")),
    m.EmitTokens(
        request_id=RequestId("r"),
        token_ids=(4,),
        logprobs=(-1.0,),
        top_logprobs=((m.TokenLogprob(4, -1.0),),),
        finish_reason="stop",
    ),
    m.RequestFailed(request_id=RequestId("r"), code="invalid_request", detail="bad"),
    m.AcquireAdapter(request_id=RequestId("r"), lora_name="a"),
    m.AdapterAcquired(request_id=RequestId("r"), adapter_id=AdapterId(3), rank=8, pinned=True),
    m.AdapterAcquireFailed(request_id=RequestId("r"), code="adapter_not_found", detail="a"),
    m.ReleaseAdapter(request_id=RequestId("r"), adapter_id=AdapterId(3)),
    m.LoadAdapter(op_id=OpId(1), lora_name="a", lora_path="/p", pinned=True),
    m.UnloadAdapter(op_id=OpId(2), lora_name="a"),
    m.DescribeAdapters(op_id=OpId(3)),
    m.HostLoadDone(adapter_id=AdapterId(1), error="broken"),
    m.HostLoadDone(
        adapter_id=AdapterId(1),
        copy=m.HostCopy(weights=b"rows", rank=8, scaling=0.5, load_s=0.1),
    ),
    m.RunStep(
        plan=m.StepPlan(
            step_id=StepId(1),
            new_seqs=(m.NewSeq(seq_id=SeqId(0), params=PARAMS, prompt_ids=(1, 2)),),
            freed_seq_ids=(SeqId(9),),
            seq_ids=(SeqId(0),),
            input_ids=(1, 2),
            query_lens=(2,),
            context_lens=(0,),
            block_tables=((BlockId(0),),),
            lora_adapters=(-1,),
            sample_rows=(True,),
        )
    ),
    m.StepDone(
        step_id=StepId(1),
        seq_ids=(SeqId(0),),
        result=m.StepResult(token_ids=(5,), logprobs=(-0.1,), top_logprobs=((),)),
    ),
    m.AdapterRetired(adapter_id=AdapterId(3)),
    m.FlushCache(op_id=OpId(4)),
    m.HostCopyReady(adapter_id=AdapterId(3), weights=b"rows", rank=8, scaling=2.0),
    m.HostCopyDropped(adapter_id=AdapterId(3)),
    m.RunStep(
        plan=m.StepPlan(
            step_id=StepId(2),
            seq_ids=(SeqId(0), SeqId(1)),
            input_ids=(1, 2),
            query_lens=(1, 1),
            context_lens=(4, 7),
            block_tables=((BlockId(0),), (BlockId(1),)),
            lora_adapters=(-1, 0),
            adapters=(m.AdapterRows(AdapterId(3), (99, 97, 98)),),
            uploads=(m.AdapterRows(AdapterId(3), (99, 97, 98)), m.AdapterRows(AdapterId(4), (5,))),
            sample_rows=(True, True),
        )
    ),
]


def test_step_result_round_trips() -> None:
    result = m.StepResult(token_ids=(5, 6), logprobs=(-0.5, -1.0), top_logprobs=((), ()))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(result), type=m.StepResult) == result


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda msg: type(msg).__name__)
def test_round_trip(msg: m.Msg) -> None:
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=type(msg))
    assert decoded == msg


def test_every_inbox_member_is_sampled() -> None:
    sampled = {type(s) for s in SAMPLES}
    for union in (m.TokenizerInbox, m.SchedulerInbox, m.AdapterInbox, m.RunnerInbox):
        for member in union.__args__:  # type: ignore[attr-defined]
            assert member in sampled, member.__name__
    assert m.AdapterAcquired in sampled


def test_plan_is_decode_is_one_token_per_row_all_sampled() -> None:
    plan = m.StepPlan(step_id=StepId(1), seq_ids=(SeqId(0), SeqId(1)), query_lens=(1, 1),
                      sample_rows=(True, True))  # fmt: skip
    assert plan.is_decode
    assert not m.StepPlan(step_id=StepId(1)).is_decode  # no rows
    chunk = m.StepPlan(step_id=StepId(1), seq_ids=(SeqId(0),), query_lens=(1,),
                       sample_rows=(False,))  # fmt: skip
    assert not chunk.is_decode
