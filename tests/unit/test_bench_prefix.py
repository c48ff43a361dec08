"""bench/bench_prefix.py's CPU parts: the multi-turn workload, the driver over a fake engine, and
the figures (percentiles, the on/off ratios and their targets), and a whole --small run."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lorasrv.messages import RequestOutput
from tests.unit.test_bench_load import load_script

bp = load_script("bench_prefix")


def test_conversations_share_a_system_prompt_per_adapter() -> None:
    convs = bp.make_conversations(["a", "b", None], 3, system_len=50, user_len=7, turns=4,
                                  vocab_size=200)  # fmt: skip
    assert len(convs) == 9
    by_adapter: dict[str | None, set[tuple[int, ...]]] = {}
    for conv in convs:
        by_adapter.setdefault(conv.adapter, set()).add(conv.system)
        assert len(conv.system) == 50
        assert [len(u) for u in conv.users] == [7] * 4
        assert all(10 <= t < 190 for t in conv.system + sum(conv.users, ()))
    assert all(len(systems) == 1 for systems in by_adapter.values())
    assert len({next(iter(s)) for s in by_adapter.values()}) == 3  # one per adapter, all apart
    users = [conv.users for conv in convs]
    assert len(set(users)) == len(users)
    again = bp.make_conversations(["a", "b", None], 3, system_len=50, user_len=7, turns=4,
                                  vocab_size=200)  # fmt: skip
    assert again == convs


def test_each_turn_extends_the_previous_prompt_and_reply() -> None:
    conv = bp.Conversation("a", (1, 2, 3), ((10, 11), (20, 21), (30,)))
    assert bp.turn_prompt(conv, []) == (1, 2, 3, 10, 11)
    replies = [(5, 5, 5), (6,)]
    assert bp.turn_prompt(conv, replies[:1]) == (1, 2, 3, 10, 11, 5, 5, 5, 20, 21)
    last = bp.turn_prompt(conv, replies)
    assert last == (1, 2, 3, 10, 11, 5, 5, 5, 20, 21, 6, 30)
    assert last[:10] == bp.turn_prompt(conv, replies[:1])


class FakeEngine:
    """Replies with `reply_len` ids in two deltas after a short wait; the last delta says how
    many prompt tokens a previous prompt of this adapter covered (a cache stand-in)."""

    def __init__(self, reply_len: int) -> None:
        self.reply_len = reply_len
        self.prompts: list[tuple[tuple[int, ...], str | None]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def submit(self, prompt: tuple[int, ...], adapter: str | None) -> AsyncIterator[object]:
        cached = max((len(p) for p, a in self.prompts if a == adapter and prompt[: len(p)] == p),
                     default=0)  # fmt: skip
        self.prompts.append((prompt, adapter))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            reply = tuple(range(len(prompt), len(prompt) + self.reply_len))
            half = self.reply_len // 2
            yield RequestOutput(request_id="r", text="", token_ids=reply[:half])
            await asyncio.sleep(0.01)
            yield RequestOutput(request_id="r", text="", token_ids=reply[half:], finished=True,
                                cached_tokens=cached)  # fmt: skip
        finally:
            self.in_flight -= 1


def test_the_driver_runs_conversations_at_once_and_turns_in_order() -> None:
    convs = bp.make_conversations(["a", "b"], 2, system_len=20, user_len=3, turns=3,
                                  vocab_size=100)  # fmt: skip
    engine = FakeEngine(reply_len=4)
    records, wall = asyncio.run(bp.run_workload(engine.submit, convs))
    assert len(records) == 12
    assert engine.most_in_flight == 4  # every conversation at once, one turn each at a time
    for index, conv in enumerate(convs):
        mine = sorted((r for r in records if r.conversation == index), key=lambda r: r.turn)
        assert [r.prompt_tokens for r in mine] == [23, 30, 37]  # + reply 4 + user 3 per turn
        replies = [r.output_ids for r in mine]
        assert [len(r) for r in replies] == [4, 4, 4]
        for turn, record in enumerate(mine):
            assert (bp.turn_prompt(conv, replies[:turn]), conv.adapter) in engine.prompts
            assert 0 < record.ttft_s < record.latency_s <= wall
        # Later turns find the previous turn's whole prompt (as a prefix cache would).
        assert [r.cached_tokens for r in mine[1:]] == [23, 30]


def _record(ttft_s: float, output: int, prompt: int, cached: int, turn: int = 0,
            conv: int = 0) -> object:  # fmt: skip
    return bp.TurnRecord(conv, turn, prompt, tuple(range(output)), cached, ttft_s, 1.0)


def test_percentile_interpolates_like_numpy() -> None:
    assert bp.percentile([], 50) is None
    assert bp.percentile([3.0], 90) == 3.0
    assert bp.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert bp.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


def test_summary_and_ratios() -> None:
    off = bp.summarize([_record(0.2, 10, 100, 0), _record(0.4, 10, 100, 0)], wall_s=2.0)
    on = bp.summarize([_record(0.05, 10, 100, 80), _record(0.07, 10, 100, 90)], wall_s=1.0)
    assert off["ttft_p50_ms"] == pytest.approx(300.0)
    assert off["output_tok_s"] == pytest.approx(10.0)
    assert off["total_tok_s"] == pytest.approx(110.0)
    assert on["cached_share"] == pytest.approx(0.85)
    ratios = bp.compare(off, on)
    assert ratios["prefix_cache_ttft_ratio"] == pytest.approx(0.2)
    assert ratios["prefix_cache_throughput_ratio"] == pytest.approx(2.0)
    assert ratios["ttft_target_met"]
    assert ratios["throughput_target_met"]
    slow = bp.compare(on, off)  # the other way round: both targets missed
    assert not slow["ttft_target_met"]
    assert not slow["throughput_target_met"]


def test_agreement_compares_first_turns_only() -> None:
    off = [_record(0.1, 3, 9, 0, turn=0, conv=0), _record(0.1, 3, 9, 0, turn=0, conv=1),
           _record(0.1, 3, 9, 0, turn=1, conv=0)]  # fmt: skip
    on = [_record(0.1, 3, 9, 0, turn=0, conv=0), _record(0.1, 2, 9, 0, turn=0, conv=1),
          _record(0.1, 1, 9, 0, turn=1, conv=0)]  # fmt: skip
    assert bp.agreement(off, on) == 0.5


def test_defaults_are_the_issues_workload() -> None:
    args = bp.parse_args([])
    assert (args.num_adapters, args.per_adapter, args.system_len, args.turns) == (8, 4, 1000, 4)
    assert args.out == bp.DEFAULT_OUT
    assert "results" not in args.out.parts
    small = bp.parse_args(["--small"])
    assert small.system_len < 100
    assert small.num_adapters == 2


def test_the_small_run_serves_later_turns_from_the_cache(tmp_path: Path) -> None:
    """--small: the whole script on CPU (tiny float32 model), both modes through the Engine."""
    out = tmp_path / "prefix.json"
    assert bp.main(["--small", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    off, on = result["cache_off"], result["cache_on"]
    assert off["cached_tokens"] == 0
    assert on["cached_share"] > 0.3  # later turns find the system prompt and the history
    assert on["prompt_tokens"] == off["prompt_tokens"]
    assert result["first_turn_agreement"] == 1.0  # float32: the same replies
    assert {"prefix_cache_ttft_ratio", "prefix_cache_throughput_ratio"} <= result.keys()
