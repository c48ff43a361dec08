"""Sampling under TP: the vocab-parallel argmax (plain-greedy steps: each rank's local maximum,
no full logits gathered) picks the argmax of the whole row, ties included; steps that need the
full row (logprobs, penalties) gather it and give tp 1's tokens and logprobs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorasrv.messages import SamplingParams
from lorasrv.model.parallel import best_of_ranks, local_argmax
from lorasrv.model.runner import ModelRunner
from lorasrv.model.sharding import Shard, shard_weight, vocab_range
from lorasrv.tp.runner import TpRunner
from tests.model.plan_driver import PlanDriver
from tests.tp.conftest import PROMPTS, ROW_ADAPTERS, runner_options
from tests.tp.test_sharding import arch


def shards(logits: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Each rank's padded vocab columns, as TpLlamaModel's head gives them."""
    vocab = logits.shape[1]
    model = arch(vocab_size=vocab)
    return [shard_weight("lm_head.weight", logits.T, model, Shard(r, size)).T for r in range(size)]


@pytest.mark.parametrize(("vocab", "size"), [(255, 2), (256, 4), (7, 3), (3, 4)])
def test_local_maxima_give_the_argmax_of_the_whole_row(vocab: int, size: int) -> None:
    torch.manual_seed(vocab + size)
    logits = torch.randn(40, vocab).round(decimals=1)  # coarse: many ties
    logits[0] = 1.0  # every column ties: token 0
    logits[1, -1] = logits[1].max() + 1  # the last token, in the padded shard
    per = -(-vocab // size)
    if per < vocab:
        logits[2, per - 1] = logits[2, per] = logits[2].max() + 1  # a tie across a boundary
    logits[3] = float("-inf")
    logits[3, vocab // 2] = 0.0
    ranges = [vocab_range(vocab, Shard(r, size)) for r in range(size)]
    parts = zip(shards(logits, size), ranges, strict=True)
    pairs = [local_argmax(s, lo, hi) for s, (lo, hi) in parts]
    assert torch.equal(best_of_ranks(torch.stack(pairs)), logits.argmax(dim=-1))


def test_steps_that_need_whole_rows_match_tp1(odd_world: dict[str, Any]) -> None:
    """Logprobs (and a repetition penalty, which changes the logits) take the gathered path:
    tp 2's greedy tokens and logprobs equal tp 1's on a vocab that does not split evenly."""
    params = SamplingParams(temperature=0.0, logprobs=True, repetition_penalty=1.3)
    options = runner_options(odd_world["base"])
    tp1 = ModelRunner(**options)
    driver1 = PlanDriver(tp1, lora_rows=16, params=params)
    driver1.add_adapter(1, tp1.make_adapter_loader()(str(odd_world["adapter"])))
    expected = driver1.generate(PROMPTS, ROW_ADAPTERS, max_new_tokens=6)
    expected_logprobs = driver1.last_logprobs
    tp2 = TpRunner(tp_size=2, **options)
    try:
        driver2 = PlanDriver(tp2, lora_rows=16, params=params)
        driver2.add_adapter(1, tp2.make_adapter_loader()(str(odd_world["adapter"])))
        assert driver2.generate(PROMPTS, ROW_ADAPTERS, max_new_tokens=6) == expected
        got = driver2.last_logprobs
    finally:
        tp2.shutdown()
    assert [len(row) for row in got] == [6] * len(PROMPTS)
    assert torch.allclose(torch.tensor(got), torch.tensor(expected_logprobs), atol=1e-4)
