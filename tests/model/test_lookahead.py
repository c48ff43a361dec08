"""lookahead.py as plain functions: which plans can be guessed, and that a guess is used only when
the real plan is exactly the step it ran (rows, positions, pages, adapters and their rows, inputs),
and never when the plan uploads adapters."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from lorasrv.ids import AdapterId, BlockId, SeqId, StepId
from lorasrv.messages import AdapterRows, NewSeq, SamplingParams, StepPlan, StepResult
from lorasrv.model.lookahead import Guess, guess_holds, next_decode_plan

PAGE = 4
ADAPTER = AdapterRows(AdapterId(7), (30, 12, 31))


class Sampled:
    """A PendingSample stand-in: the parent step's tokens, already on the host."""

    def __init__(self, token_ids: list[int]) -> None:
        self._result = StepResult(token_ids=tuple(token_ids))

    def result(self) -> StepResult:
        return self._result


def decode_plan(**changes: Any) -> StepPlan:
    plan = StepPlan(
        step_id=StepId(5),
        seq_ids=(SeqId(1), SeqId(2)),
        input_ids=(11, 12),
        query_lens=(1, 1),
        context_lens=(6, 3),  # next tokens at positions 7 (page 1) and 4 (page 1)
        block_tables=((BlockId(8), BlockId(9)), (BlockId(3), BlockId(4))),
        lora_adapters=(-1, 0),
        adapters=(ADAPTER,),
        sample_rows=(True, True),
    )
    return msgspec.structs.replace(plan, **changes)


def test_next_decode_plan_moves_every_row_one_position() -> None:
    planned = next_decode_plan(decode_plan(), PAGE, context_length=64)
    assert planned is not None
    guess, keep = planned
    assert keep == (0, 1)
    assert guess.step_id == 6
    assert guess.context_lens == (7, 4)
    assert guess.seq_ids == (1, 2)
    assert guess.block_tables == decode_plan().block_tables
    assert guess.input_ids == (0, 0)  # placeholders: the parent's tokens come from the device


@pytest.mark.parametrize(
    "changes",
    [
        {"query_lens": (1, 3), "input_ids": (11, 12, 13, 14)},  # a prefill chunk
        {"sample_rows": (True, False)},
        {"new_seqs": (NewSeq(seq_id=SeqId(2), params=SamplingParams(), prompt_ids=(1,)),)},
        {"block_tables": ((BlockId(8), BlockId(9)), (BlockId(3),))},  # no page for position 4
        {
            "seq_ids": (),
            "input_ids": (),
            "query_lens": (),
            "context_lens": (),
            "block_tables": (),
            "lora_adapters": (),
            "sample_rows": (),
        },
    ],
)
def test_plans_that_cannot_be_guessed(changes: dict[str, Any]) -> None:
    assert next_decode_plan(decode_plan(**changes), PAGE, context_length=64) is None


def test_no_guess_past_the_context_length() -> None:
    assert next_decode_plan(decode_plan(), PAGE, context_length=9) is not None
    assert next_decode_plan(decode_plan(), PAGE, context_length=8) is None  # 7 + 1 tokens


def make_guess(**changes: Any) -> Guess:
    planned = next_decode_plan(decode_plan(**changes), PAGE, context_length=64)
    assert planned is not None
    plan, keep = planned
    return Guess(plan, keep, Sampled([21, 22]), Sampled([31, 32]))  # type: ignore[arg-type]


def real_plan(**changes: Any) -> StepPlan:
    fields: dict[str, Any] = {"step_id": StepId(6), "input_ids": (21, 22), "context_lens": (7, 4)}
    return decode_plan(**(fields | changes))


def test_the_guess_holds_for_the_plan_it_ran() -> None:
    assert guess_holds(make_guess(), real_plan(), PAGE)
    # pages past the ones the step touched may differ (a reservation made since)
    tables = ((BlockId(8), BlockId(9), BlockId(30)), (BlockId(3), BlockId(4), BlockId(31)))
    assert guess_holds(make_guess(), real_plan(block_tables=tables), PAGE)
    # rows freed elsewhere in the batch do not matter
    assert guess_holds(make_guess(), real_plan(freed_seq_ids=(SeqId(9),)), PAGE)
    # nor how the plan lists its adapters: each row's adapter and rows are what count
    other = AdapterRows(AdapterId(3), (1,))
    listed = real_plan(adapters=(other, ADAPTER), lora_adapters=(-1, 1))
    assert guess_holds(make_guess(), listed, PAGE)


@pytest.mark.parametrize(
    "changes",
    [
        {"input_ids": (21, 99)},  # not the parent's tokens
        {"seq_ids": (SeqId(1), SeqId(3))},
        {"context_lens": (7, 5)},
        # another adapter, or the same one in other rows (the guess read the old ones)
        {"adapters": (AdapterRows(AdapterId(8), (30, 12, 31)),)},
        {"adapters": (AdapterRows(AdapterId(7), (30, 12, 32)),)},
        {"lora_adapters": (-1, -1)},
        # an upload of any adapter, even one no row uses: the guess ran before it
        {"uploads": (AdapterRows(AdapterId(9), (40,)),)},
        {"block_tables": ((BlockId(8), BlockId(10)), (BlockId(3), BlockId(4)))},  # moved page
        {"new_seqs": (NewSeq(seq_id=SeqId(1), params=SamplingParams(), prompt_ids=(1,)),)},
    ],
)
def test_the_guess_is_dropped_when_the_plan_differs(changes: dict[str, Any]) -> None:
    assert not guess_holds(make_guess(), real_plan(**changes), PAGE)


def test_rows_known_to_stop_are_left_out() -> None:
    planned = next_decode_plan(decode_plan(last_rows=(True, False)), PAGE, context_length=64)
    assert planned is not None
    guess, keep = planned
    assert keep == (1,)
    assert guess.seq_ids == (2,)
    assert guess.context_lens == (4,)
    assert guess.lora_adapters == (0,)
    assert guess.adapters == (ADAPTER,)
    assert guess.block_tables == ((BlockId(3), BlockId(4)),)
    # the real plan without the stopped row, fed the parent's token of the row that goes on
    without = decode_plan(
        step_id=StepId(6), seq_ids=(SeqId(2),), input_ids=(22,), query_lens=(1,),
        context_lens=(4,), block_tables=((BlockId(3), BlockId(4)),), lora_adapters=(0,),
        sample_rows=(True,),
    )  # fmt: skip
    assert guess_holds(make_guess(last_rows=(True, False)), without, PAGE)
    wrong_token = msgspec.structs.replace(without, input_ids=(21,))
    assert not guess_holds(make_guess(last_rows=(True, False)), wrong_token, PAGE)
    # the stopped row went on after all (say, the scheduler's count was off): dropped
    assert not guess_holds(make_guess(last_rows=(True, False)), real_plan(), PAGE)


def test_no_guess_when_every_row_stops() -> None:
    assert next_decode_plan(decode_plan(last_rows=(True, True)), PAGE, context_length=64) is None


def test_a_row_that_stopped_drops_the_guess() -> None:
    one_row = decode_plan(
        step_id=StepId(6), seq_ids=(SeqId(1),), input_ids=(21,), query_lens=(1,),
        context_lens=(7,), block_tables=((BlockId(8), BlockId(9)),), lora_adapters=(-1,),
        sample_rows=(True,),
    )  # fmt: skip
    assert not guess_holds(make_guess(), one_row, PAGE)
