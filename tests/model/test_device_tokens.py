"""DeviceTokens on CPU: each sequence's last sampled token, read back into a plan's device inputs
at the right positions, across re-adds, freed slots given to others and a table that grows."""

from __future__ import annotations

import pytest
import torch

from lorasrv.ids import BlockId, SeqId, StepId
from lorasrv.messages import StepPlan
from lorasrv.model.device_tokens import DeviceTokens


def plan(seqs: list[int], inputs: list[int], lens: list[int], device: list[bool]) -> StepPlan:
    rows = len(seqs)
    return StepPlan(
        step_id=StepId(1), seq_ids=tuple(map(SeqId, seqs)), input_ids=tuple(inputs),
        query_lens=tuple(lens), context_lens=(0,) * rows, block_tables=((BlockId(0),),) * rows,
        lora_adapters=(-1,) * rows, sample_rows=(True,) * rows, device_inputs=tuple(device),
    )  # fmt: skip


def filled(tokens: DeviceTokens, step: StepPlan) -> list[int]:
    ids = torch.tensor(step.input_ids, dtype=torch.int32)
    tokens.fill(ids, step)
    return ids.tolist()


def test_device_inputs_take_the_last_token_each_sequence_sampled() -> None:
    tokens = DeviceTokens(torch.device("cpu"))
    for seq_id in (1, 2, 3):
        tokens.add(SeqId(seq_id))
    tokens.record([SeqId(1), SeqId(2), SeqId(3)], torch.tensor([10, 20, 30]))
    tokens.record([SeqId(2)], torch.tensor([21]))  # a later step sampled seq 2 again
    # a prefill chunk of 3 tokens between two device rows: positions follow the query lengths
    step = plan([2, 4, 1], [0, 7, 8, 9, 0], [1, 3, 1], [True, False, True])
    tokens.add(SeqId(4))
    assert filled(tokens, step) == [21, 7, 8, 9, 10]
    assert filled(tokens, step) == [21, 7, 8, 9, 10]  # the same rows again (cached index)
    tokens.record([SeqId(2), SeqId(1)], torch.tensor([22, 11]))
    assert filled(tokens, step) == [22, 7, 8, 9, 11]


def test_a_slot_freed_and_given_to_another_sequence_is_not_read_before_it_samples() -> None:
    tokens = DeviceTokens(torch.device("cpu"))
    tokens.add(SeqId(1))
    tokens.record([SeqId(1)], torch.tensor([5]))
    tokens.remove(SeqId(1))
    tokens.add(SeqId(2))  # takes seq 1's slot, which still holds 5
    with pytest.raises(ValueError, match="no step launched since it was added sampled"):
        filled(tokens, plan([2], [0], [1], [True]))
    tokens.add(SeqId(2))  # re-added (a recompute): nothing sampled since either
    with pytest.raises(ValueError, match="no step launched"):
        filled(tokens, plan([2], [0], [1], [True]))
    tokens.record([SeqId(2)], torch.tensor([6]))
    assert filled(tokens, plan([2], [0], [1], [True])) == [6]
    with pytest.raises(ValueError, match="is not one token"):
        filled(tokens, plan([2], [0, 0], [2], [True]))


def test_the_table_grows_and_keeps_every_token() -> None:
    tokens = DeviceTokens(torch.device("cpu"))
    seqs = [SeqId(i) for i in range(600)]  # past the first table's 256 slots, twice
    for i, seq_id in enumerate(seqs):
        tokens.add(seq_id)
        tokens.record([seq_id], torch.tensor([1000 + i]))
    step = plan(list(range(600)), [0] * 600, [1] * 600, [True] * 600)
    assert filled(tokens, step) == [1000 + i for i in range(600)]
