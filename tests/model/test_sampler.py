"""Sampler: each stage against a hand computation or a frequency test, seeds, logprobs, history."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lorasrv.ids import SeqId
from lorasrv.messages import NewSeq, SamplingParams
from lorasrv.model.sampler import Sampler
from lorasrv.model.sampling_ops import apply_penalties, apply_top_k_top_p, draw_seed

CPU = torch.device("cpu")
# probs of the 4-token distribution below: [0.5, 0.3, 0.15, 0.05]
PROBS_4 = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS_4 = PROBS_4.log()


def make_sampler(vocab_size: int, seed: int = 0) -> Sampler:
    return Sampler(vocab_size, CPU, seed=seed)


def add(
    sampler: Sampler,
    seq_id: int,
    prompt_ids: tuple[int, ...] = (),
    output_ids: tuple[int, ...] = (),
    **params: Any,
) -> SeqId:
    sampler.add_seq(
        NewSeq(
            seq_id=SeqId(seq_id),
            params=SamplingParams(**params),
            prompt_ids=prompt_ids,
            output_ids=output_ids,
        )
    )
    return SeqId(seq_id)


def draw_many(
    logits: torch.Tensor, num_rows: int = 2000, num_steps: int = 4, **params: Any
) -> torch.Tensor:
    """Token counts [vocab] over num_rows * num_steps draws of one distribution."""
    sampler = make_sampler(logits.shape[0])
    seq_ids = [add(sampler, i, **params) for i in range(num_rows)]
    batch = logits.expand(num_rows, -1).contiguous()
    counts = torch.zeros(logits.shape[0], dtype=torch.int64)
    for _ in range(num_steps):
        tokens = torch.tensor(sampler.sample(batch, seq_ids).token_ids)
        counts += torch.bincount(tokens, minlength=logits.shape[0])
    return counts


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def support(counts: torch.Tensor) -> set[int]:
    return set(torch.nonzero(counts).flatten().tolist())


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("params", [{"temperature": 0.0}, {"temperature": 0.8, "top_k": 1}])
def test_greedy_is_argmax(params: dict[str, Any]) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    sampler = make_sampler(50)
    seq_ids = [add(sampler, i, **params) for i in range(6)]
    for _ in range(3):
        result = sampler.sample(logits, seq_ids)
        assert list(result.token_ids) == logits.argmax(dim=-1).tolist()
        assert result.logprobs == ()
        assert result.top_logprobs == ()


# ----------------------------------------------------------------------------- sampling stages


def test_temperature_frequencies_match_softmax() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    counts = draw_many(logits, temperature=0.5)
    # df = 4: the 99.9 % quantile is 18.5; the untempered softmax must be far off.
    assert chi_square(counts, (logits / 0.5).softmax(-1)) < 18.5
    assert chi_square(counts, logits.softmax(-1)) > 200


def test_top_k_never_picks_outside_top_k() -> None:
    logits = torch.tensor([0.1, 2.0, 0.3, 1.9, 0.0, 1.8, -1.0, 0.2])
    counts = draw_many(logits, top_k=3)
    assert support(counts) == {1, 3, 5}
    assert chi_square(counts[[1, 3, 5]], logits[[1, 3, 5]].softmax(-1)) < 13.8  # df 2


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.3, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, kept: set[int]) -> None:
    counts = draw_many(LOGITS_4, top_p=top_p)
    assert support(counts) == kept
    index = sorted(kept)
    if len(index) > 1:
        renormalized = PROBS_4[index] / PROBS_4[index].sum()
        assert chi_square(counts[index], renormalized) < 16.3  # df <= 3


def test_top_k_top_p_function_masks_exactly() -> None:
    logits = torch.stack([LOGITS_4] * 4)
    top_k = torch.tensor([2.0, 4.0, 3.0, 4.0])
    top_p = torch.tensor([math.inf, 0.75, 0.9, 0.0])
    out = apply_top_k_top_p(logits, top_k, top_p)
    kept = (out > float("-inf")).tolist()
    # row 2: top 3 renormalized are [0.526, 0.316, 0.158]; 0.9 needs all three.
    # row 3: top_p 0 still keeps the best token.
    assert kept == [
        [True, True, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, False, False, False],
    ]
    finite = out > float("-inf")
    assert torch.equal(out[finite], logits[finite])  # kept logits are untouched


@pytest.mark.parametrize(("min_p", "kept"), [(0.25, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0})])
def test_min_p_drops_tokens_below_fraction_of_max(min_p: float, kept: set[int]) -> None:
    counts = draw_many(LOGITS_4, min_p=min_p)
    assert support(counts) == kept


# ----------------------------------------------------------------------------- penalties


def test_apply_penalties_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 3.0]] * 3)
    counts = torch.tensor([[0, 1, 2, 1, 0]] * 3, dtype=torch.int32)  # output: 1, 2, 2, 3
    prompt_mask = torch.tensor([[True, False, False, False, False]] * 3)
    params = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [1.0, 0.0, 0.25]])
    out = apply_penalties(logits, counts, prompt_mask, params)
    expected = torch.tensor(
        [
            [1.0, -2.0, 0.25, 0.5, 3.0],  # repetition: prompt or output, / if > 0 else *
            [2.0, -1.5, -0.5, 0.5, 3.0],  # frequency: output counts only, not the prompt
            [2.0, -1.25, 0.25, 0.75, 3.0],  # presence: once per token in the output
        ]
    )
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"repetition_penalty": 1.5}, 2),  # 2.0 / 1.5 (prompt), 1.9 / 1.5 (output) < 1.8
        ({"frequency_penalty": 0.2}, 2),  # token 0: 2.0 - 0.6; token 1: 1.9 - 0.2
        ({"presence_penalty": 0.25}, 2),  # 1.75 and 1.65 < 1.8
        ({"presence_penalty": 0.15}, 0),  # 1.85 > 1.8 > 1.75
        ({"frequency_penalty": 0.03}, 0),  # 2.0 - 0.09 > 1.9 - 0.03
    ],
)
def test_penalties_change_greedy_choice(params: dict[str, Any], expected: int) -> None:
    sampler = make_sampler(4)
    seq_id = add(sampler, 1, prompt_ids=(0,), output_ids=(0, 0, 0, 1), temperature=0.0, **params)
    logits = torch.tensor([[2.0, 1.9, 1.8, -5.0]])
    assert sampler.sample(logits, [seq_id]).token_ids == (expected,)


def test_history_includes_sampled_tokens() -> None:
    sampler = make_sampler(4)
    seq_id = add(sampler, 1, temperature=0.0, frequency_penalty=0.15)
    plain = add(sampler, 2, temperature=0.0)
    logits = torch.tensor([[1.0, 0.9, 0.8, 0.0]] * 2)
    tokens = [sampler.sample(logits, [seq_id, plain]).token_ids for _ in range(4)]
    # 0 (1.0); 1 (0.9 > 0.85); 0 (0.85 > 0.8 > 0.75); 2 (0.8 > 0.75 > 0.7)
    assert tokens == [(0, 0), (1, 0), (0, 0), (2, 0)]


def test_penalty_table_growth_keeps_counts() -> None:
    sampler = make_sampler(4)
    first = add(sampler, 0, temperature=0.0, presence_penalty=1.0)
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0]])
    assert sampler.sample(logits, [first]).token_ids == (0,)
    others = [add(sampler, i, temperature=0.0, presence_penalty=1.0) for i in range(1, 20)]
    assert sampler.sample(logits, [first]).token_ids == (1,)
    batch = logits.expand(len(others), -1)
    assert sampler.sample(batch, others).token_ids == (0,) * len(others)


# ----------------------------------------------------------------------------- seeds, batches


def run_seeded(sampler: Sampler, seeded: SeqId, others: list[SeqId], steps: int) -> list[int]:
    logits_rng = torch.Generator().manual_seed(7)
    noise_rng = torch.Generator().manual_seed(len(others))
    tokens = []
    for _ in range(steps):
        row = torch.randn(1, 30, generator=logits_rng)
        rest = torch.randn(len(others), 30, generator=noise_rng)
        batch = torch.cat([rest[: len(others) // 2], row, rest[len(others) // 2 :]])
        seq_ids = [*others[: len(others) // 2], seeded, *others[len(others) // 2 :]]
        tokens.append(sampler.sample(batch, seq_ids).token_ids[len(others) // 2])
    return tokens


def test_seeded_rows_reproduce_across_samplers_and_batches() -> None:
    alone = make_sampler(30, seed=1)
    alone_tokens = run_seeded(alone, add(alone, 5, seed=1234, top_p=0.95), [], 20)
    crowded = make_sampler(30, seed=2)
    others = [
        add(crowded, 1),
        add(crowded, 2, seed=99),
        add(crowded, 3, temperature=0.0),
        add(crowded, 4, top_k=5, presence_penalty=0.5),
    ]
    seeded = add(crowded, 5, seed=1234, top_p=0.95)
    assert run_seeded(crowded, seeded, others, 20) == alone_tokens
    other_seed = make_sampler(30, seed=1)
    assert run_seeded(other_seed, add(other_seed, 5, seed=4321, top_p=0.95), [], 20) != (
        alone_tokens
    )


def test_mixed_batch() -> None:
    vocab = 40
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(3))
    sampler = make_sampler(vocab)
    seq_ids = [
        add(sampler, 0, temperature=0.0),
        add(sampler, 1, temperature=0.7, top_k=3),
        add(sampler, 2, seed=42, temperature=1.3, min_p=0.05),
        add(sampler, 3, top_k=1),
        add(sampler, 4, top_p=0.5, repetition_penalty=1.2, prompt_ids=(1, 2, 3)),
    ]
    solo = make_sampler(vocab, seed=9)
    solo_id = add(solo, 2, seed=42, temperature=1.3, min_p=0.05)
    top3 = set(logits[1].topk(3).indices.tolist())
    for _ in range(10):
        tokens = sampler.sample(logits, seq_ids).token_ids
        assert tokens[0] == int(logits[0].argmax())
        assert tokens[3] == int(logits[3].argmax())
        assert tokens[1] in top3
        assert tokens[2] == solo.sample(logits[2:3], [solo_id]).token_ids[0]


# ----------------------------------------------------------------------------- logprobs


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    vocab = 20
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(4))
    original = logits.clone()
    sampler = make_sampler(vocab)
    seq_ids = [
        add(sampler, 0, logprobs=True, temperature=0.3, repetition_penalty=2.0, prompt_ids=(0,)),
        add(sampler, 1, temperature=0.0, frequency_penalty=1.0, output_ids=(5, 5)),
        add(sampler, 2, top_k=4),
    ]
    result = sampler.sample(logits, seq_ids)
    assert torch.equal(logits, original)
    expected = logits.log_softmax(-1).gather(1, torch.tensor(result.token_ids)[:, None])
    assert result.logprobs == pytest.approx(expected.flatten().tolist(), abs=1e-6)
    assert result.top_logprobs == ()


def test_top_logprobs_sorted_and_sized() -> None:
    vocab = 20
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(5))
    sampler = make_sampler(vocab)
    seq_ids = [add(sampler, 0, top_logprobs=3), add(sampler, 1), add(sampler, 2, top_logprobs=5)]
    result = sampler.sample(logits, seq_ids)
    assert len(result.logprobs) == 3
    assert [len(row) for row in result.top_logprobs] == [3, 0, 5]
    for row, k in [(0, 3), (2, 5)]:
        entries = result.top_logprobs[row]
        values = [entry.logprob for entry in entries]
        assert values == sorted(values, reverse=True)
        best = logits[row].log_softmax(-1).topk(k)
        assert [entry.token_id for entry in entries] == best.indices.tolist()
        assert values == pytest.approx(best.values.tolist(), abs=1e-6)


# ----------------------------------------------------------------------------- lifecycle


def test_remove_then_add_starts_fresh() -> None:
    sampler = make_sampler(4)
    logits = torch.tensor([[1.0, 0.9, 0.0, -1.0]])
    seq_id = add(sampler, 7, temperature=0.0, presence_penalty=0.5)
    assert sampler.sample(logits, [seq_id]).token_ids == (0,)
    sampler.remove_seq(seq_id)
    sampler.remove_seq(SeqId(12345))  # unknown: ignored
    add(sampler, 7, temperature=0.0, presence_penalty=0.5)  # reuses the freed penalty slot
    assert sampler.sample(logits, [seq_id]).token_ids == (0,)  # a stale count would give 1
    assert sampler.sample(logits, [seq_id]).token_ids == (1,)


def test_readded_seq_forgets_old_prompt() -> None:
    sampler = make_sampler(4)
    logits = torch.tensor([[1.0, 0.9, 0.0, -1.0]])
    seq_id = add(sampler, 7, prompt_ids=(0,), temperature=0.0, repetition_penalty=2.0)
    assert sampler.sample(logits, [seq_id]).token_ids == (1,)
    sampler.remove_seq(seq_id)
    add(sampler, 7, prompt_ids=(2,), temperature=0.0, repetition_penalty=2.0)
    assert sampler.sample(logits, [seq_id]).token_ids == (0,)


def test_readded_seed_restarts_its_stream() -> None:
    sampler = make_sampler(30)
    logits = torch.zeros(1, 30)
    seq_id = add(sampler, 3, seed=11)
    first = [sampler.sample(logits, [seq_id]).token_ids[0] for _ in range(8)]
    add(sampler, 3, seed=11)  # same id again: replaces the old state
    assert [sampler.sample(logits, [seq_id]).token_ids[0] for _ in range(8)] == first
    assert len(set(first)) > 1


def test_readded_with_its_outputs_a_seeded_seq_goes_on_with_its_stream() -> None:
    """A preempted sequence is re-added with the tokens it generated: its next draw is the one it
    would have made without the preemption (seeded by position), not its first one again."""
    sampler = make_sampler(30)
    logits = torch.zeros(1, 30)
    seq_id = add(sampler, 3, seed=11)
    first = [sampler.sample(logits, [seq_id]).token_ids[0] for _ in range(8)]
    add(sampler, 3, seed=11, output_ids=tuple(first[:5]))
    assert [sampler.sample(logits, [seq_id]).token_ids[0] for _ in range(3)] == first[5:]
    # a neighbouring seed is another stream, not this one shifted by a position
    other = add(sampler, 4, seed=12)
    assert [sampler.sample(logits, [other]).token_ids[0] for _ in range(7)] != first[1:]


def test_draw_seeds_differ_by_seed_and_position() -> None:
    seeds = {draw_seed(seed, k) for seed in (0, 1, 2, -1, 12345) for k in range(50)}
    assert len(seeds) == 250
    assert all(0 <= s < 1 << 64 for s in seeds)


# ----------------------------------------------------------------------------- pending samples


def test_pending_sample_keeps_tokens_on_the_device_and_matches_sample() -> None:
    vocab = 16
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(6))
    sampler = make_sampler(vocab)
    greedy = {"temperature": 0.0}
    seq_ids = [
        add(sampler, 0, **greedy),
        add(sampler, 1, top_logprobs=2, **greedy),
        add(sampler, 2, logprobs=True, **greedy),
    ]
    pending = sampler.sample_async(logits, seq_ids)
    assert pending.token_ids.tolist() == logits.argmax(-1).tolist()
    result = pending.result()
    assert result is pending.result()  # materialized once
    assert list(result.token_ids) == logits.argmax(-1).tolist()
    assert [len(row) for row in result.top_logprobs] == [0, 2, 0]
    assert result.top_logprobs[1][0].token_id == result.token_ids[1]
    assert result == sampler.sample(logits, seq_ids)
