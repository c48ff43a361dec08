"""The TP control path: plans and results as flat words (plan_codec.py) and their trip through
shared memory (shm_channel.py) to NullRunner workers (no model, so these tests are fast)."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasrv.ids import AdapterId, BlockId, SeqId, StepId
from lorasrv.messages import AdapterRows, NewSeq, SamplingParams, StepPlan, StepResult
from lorasrv.messages import TokenLogprob as T
from lorasrv.tp.monitor import TpWorkerError
from lorasrv.tp.null_runner import NULL_RUNNER, expected_tokens, made_up_top_logprobs
from lorasrv.tp.plan_codec import (
    MSGPACK_FIELDS,
    PlanDecoder,
    PlanEncoder,
    decode_result,
    encode_result,
)
from lorasrv.tp.runner import TpRunner
from lorasrv.tp.shm_channel import COMMAND_BYTES, RESULT_BYTES

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 4096,
    "eos_token_id": 2,
}


def random_plans(rng: random.Random, num_steps: int) -> Iterator[StepPlan]:
    """A server's life in plans: sequences start (new_seqs), grow a page now and then, get
    preempted and come back under the same id with other pages, finish; adapters come and go."""
    tables: dict[int, tuple[int, ...]] = {}
    next_id = 2**40  # ids past int32 travel too
    for step in range(num_steps):
        freed = [s for s in tables if rng.random() < 0.15]
        for seq_id in freed:
            del tables[seq_id]
        new = []
        for _ in range(rng.randrange(3)):
            seq_id = rng.choice([next_id, *freed]) if freed else next_id  # ids come back
            next_id += seq_id == next_id
            tables[seq_id] = tuple(rng.randrange(4096) for _ in range(rng.randrange(1, 6)))
            params = SamplingParams(temperature=rng.random(), stop=("x",), seed=rng.randrange(9))
            new.append(NewSeq(seq_id=SeqId(seq_id), params=params, prompt_ids=(1, 2, 3)))
        for seq_id, table in tables.items():
            roll = rng.random()
            if roll < 0.3:
                tables[seq_id] = (*table, rng.randrange(4096))
            elif roll < 0.35:  # not an extension: sent whole
                tables[seq_id] = (rng.randrange(4096), *table[1:])
            elif roll < 0.4:
                tables[seq_id] = table[:-1] or table
        rows = [s for s in tables if rng.random() < 0.8]
        adapters = tuple(
            AdapterRows(AdapterId(rng.randrange(99)), tuple(rng.sample(range(512), rank)))
            for rank in rng.sample(range(1, 9), rng.randrange(3))
        )
        yield StepPlan(
            step_id=StepId(step),
            new_seqs=tuple(new),
            freed_seq_ids=tuple(SeqId(s) for s in freed),
            seq_ids=tuple(SeqId(s) for s in rows),
            input_ids=tuple(rng.randrange(1000) for _ in rows),
            query_lens=(1,) * len(rows),
            context_lens=tuple(rng.randrange(1, 99) for _ in rows),
            block_tables=tuple(tuple(BlockId(b) for b in tables[s]) for s in rows),
            lora_adapters=tuple(rng.randrange(-1, len(adapters)) for _ in rows),
            adapters=adapters,
            uploads=adapters[:1],
            sample_rows=tuple(rng.random() < 0.9 for _ in rows),
            device_inputs=tuple(rng.random() < 0.5 for _ in rows) if rng.random() < 0.5 else (),
        )


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32))
def test_plans_survive_the_words_in_order(seed: int) -> None:
    encoder, decoder = PlanEncoder(), PlanDecoder()
    for plan in random_plans(random.Random(seed), 60):
        words, tail = encoder.encode(plan)
        decoded = decoder.decode(words.tobytes() + tail)
        assert decoded == plan
        assert [type(x) for x in decoded.sample_rows] == [bool] * len(plan.sample_rows)
        assert bool(tail) == bool(plan.new_seqs)  # msgpack only for new sequences


def test_a_decode_step_sends_new_pages_only_and_no_msgpack() -> None:
    assert MSGPACK_FIELDS == ("new_seqs",)
    encoder = PlanEncoder()
    tables = [tuple(range(r * 100, r * 100 + 64)) for r in range(8)]

    def plan(step: int) -> StepPlan:
        return StepPlan(
            step_id=StepId(step),
            seq_ids=tuple(SeqId(r) for r in range(8)),
            input_ids=(5,) * 8,
            query_lens=(1,) * 8,
            context_lens=(7,) * 8,
            block_tables=tuple(tuple(BlockId(b) for b in t) for t in tables),
            sample_rows=(True,) * 8,
        )

    first, _ = encoder.encode(plan(0))
    tables = [(*t, 9999) for t in tables]
    second, tail = encoder.encode(plan(1))
    assert len(first) - len(second) == 8 * 64 - 8  # whole tables, then one page per row
    assert tail == b""


def test_a_plan_that_fails_to_encode_resets_both_ends() -> None:
    encoder, decoder = PlanEncoder(), PlanDecoder()
    plans = list(random_plans(random.Random(7), 12))
    for plan in plans[:6]:
        decoder.decode(b"".join(map(bytes, encoder.encode(plan))))
    bad = msgspec.structs.replace(plans[6], block_tables=((1,),) * (len(plans[6].seq_ids) + 1))
    with pytest.raises(ValueError, match="zip"):
        encoder.encode(bad)  # never sent: the decoder does not see it
    for plan in plans[6:]:
        assert decoder.decode(b"".join(map(bytes, encoder.encode(plan)))) == plan


def test_results_survive_the_words_exactly() -> None:
    result = StepResult(
        token_ids=(3, 2**40, 0),
        logprobs=(-0.1, -1 / 3, -1e-30),
        top_logprobs=((T(1, -0.5), T(9, -2 / 3)), (), (T(4, float("-inf")),)),
    )
    words = encode_result(result)
    assert decode_result(words.tobytes(), len(words)) == result
    assert decode_result(encode_result(StepResult()).tobytes(), 3) == StepResult()


# ----------------------------------------------------------------------------- through processes


@pytest.fixture(scope="module")
def null_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpRunner]:
    model = tmp_path_factory.mktemp("null-model")
    (model / "config.json").write_text(json.dumps(CONFIG))
    runner = TpRunner(tp_size=2, model_path=str(model), device="cpu", runner_class=NULL_RUNNER)
    yield runner
    runner.shutdown()


def decode_plan(step: int, rows: int, pages: int, **fields: object) -> StepPlan:
    return StepPlan(
        step_id=StepId(step),
        seq_ids=tuple(SeqId(r) for r in range(rows)),
        input_ids=tuple(range(rows)),
        query_lens=(1,) * rows,
        context_lens=(pages * 16 - 1,) * rows,
        block_tables=tuple(tuple(range(r + step, r + step + pages)) for r in range(rows)),
        sample_rows=(True,) * rows,
        **fields,  # type: ignore[arg-type]
    )


def test_steps_of_any_size_reach_every_worker(null_runner: TpRunner) -> None:
    """Plans and results in shared memory, a plan and a result too large for their slots over
    gloo, and the slots in turn before and after."""
    big_rows, big_pages = 64, COMMAND_BYTES // 8 // 64 + 16  # one spilled plan
    num_top = RESULT_BYTES // 8 // 2 // big_rows + 8  # one spilled result
    shapes = [(1, 3), (16, 40), (big_rows, big_pages), (3, 2), (64, 70)]
    for step, (rows, pages) in enumerate(shapes * 2):
        plan = decode_plan(step, rows, pages)
        assert null_runner.step(plan).token_ids == expected_tokens(plan)
    params = SamplingParams(top_logprobs=num_top, logprobs=True)
    new = tuple(NewSeq(seq_id=SeqId(r), params=params, prompt_ids=(1,)) for r in range(big_rows))
    plan = decode_plan(99, big_rows, 4, new_seqs=new)
    result = null_runner.step(plan)
    assert result.top_logprobs == (made_up_top_logprobs(num_top),) * big_rows
    assert null_runner.step(decode_plan(100, 2, 4)).token_ids == expected_tokens(
        decode_plan(100, 2, 4)
    )
    empty = StepPlan(step_id=StepId(101), freed_seq_ids=tuple(SeqId(r) for r in range(big_rows)))
    assert null_runner.step(empty) == StepResult()


def test_a_worker_killed_mid_wait_ends_the_step(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    runner = TpRunner(tp_size=2, model_path=str(tmp_path), device="cpu", runner_class=NULL_RUNNER)
    try:
        assert runner.step(decode_plan(0, 2, 2)).token_ids == expected_tokens(decode_plan(0, 2, 2))
        os.kill(runner.worker_pids[0], signal.SIGSTOP)  # rank 0 will never answer...
        os.kill(runner.worker_pids[1], signal.SIGKILL)  # ...and the monitor sees rank 1 die
        started = time.monotonic()
        with pytest.raises(TpWorkerError, match=r"tp worker 1 .* killed by SIGKILL"):
            runner.step(decode_plan(1, 2, 2))
        assert time.monotonic() - started < 5
    finally:
        runner.shutdown()
