"""bench/many_sim.py, the CPU replay of bench_many.py's runs: its clock and mailboxes, the
H100 geometry and cost model, the runner's upload waits, a small run end to end, and the capped
run's prediction as a guard on the admission policy."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import many_sim
import many_sim_engine as engine
import many_sim_model as model

from lorasrv.ids import AdapterId, SeqId, StepId
from lorasrv.messages import AdapterRows, HostCopyReady, RunStep, StepDone, StepPlan


def test_clock_runs_callbacks_in_time_order_ties_in_order_of_scheduling() -> None:
    clock, seen = engine.Clock(), []
    for when, tag in ((2.0, "c"), (1.0, "a"), (1.0, "b")):
        clock.at(when, lambda tag=tag: seen.append((clock.now, tag)))
    clock.run(lambda: False)
    assert seen == [(1.0, "a"), (1.0, "b"), (2.0, "c")]
    clock.at(5.0, lambda: None)
    with pytest.raises(RuntimeError, match="no end"):
        clock.run(lambda: False, limit_s=4.0)


def test_mailbox_handles_what_arrives_together_then_runs_after_once() -> None:
    clock, log = engine.Clock(), []
    box = engine.Mailbox(clock, log.append, lambda: log.append("after"))
    box.send("a")
    box.send("b")
    box.send("c", delay=1.0)
    clock.run(lambda: False)
    assert log == ["a", "b", "after", "c", "after"]


def test_row_bytes_and_geometry_of_the_h100_arena() -> None:
    # per layer: qkv 3*4096 + 6144, o 4096 + 4096, gate/up 2*4096 + 2*14336, down 14336 + 4096
    assert model.row_bytes(model.LLAMA3_8B, model.ALL) == 81920 * 32 * 2
    assert model.row_bytes(model.LLAMA3_8B, model.ATTN) == 26624 * 32 * 2
    ready = model.h100_ready(model.ATTN, 16)
    assert ready.kv_page_bytes == 128 * 1024 * 16
    assert ready.lora_max_rows * ready.lora_row_bytes <= ready.num_kv_pages * ready.kv_page_bytes


def test_cost_model_matches_the_h100_step_times_it_was_fitted_to() -> None:
    cost = model.H100
    base = model.StepShape(True, 64, 64, 64 * 190, 0, 0)
    assert cost.step_s(base) == pytest.approx(7.25e-3, rel=0.03)  # base64: 3.727 s / 514
    rows = 30 * model.row_bytes(model.LLAMA3_8B, model.ALL)
    capped = model.StepShape(True, 11, 11, 11 * 190, 8, 8 * rows)
    assert cost.step_s(capped) == pytest.approx(8.69e-3, rel=0.05)  # cap8: 25.4 s / 2922
    prefill = model.StepShape(False, 16, 2048, 2048, 0, 0)
    assert cost.step_s(prefill) == pytest.approx(
        2048 * (cost.prefill_token_s + cost.context_token_s)
    )


class Replies:
    def __init__(self) -> None:
        self.msgs: list[Any] = []

    def send(self, msg: Any, delay: float = 0.0) -> None:
        self.msgs.append(msg)


def decode_plan(step: int, adapter: int, uploads: tuple[AdapterRows, ...] = ()) -> StepPlan:
    rows = AdapterRows(AdapterId(adapter), (10, 11))
    return StepPlan(step_id=StepId(step), seq_ids=(SeqId(0),), input_ids=(1,), query_lens=(1,),
                    context_lens=(5,), block_tables=((0,),), lora_adapters=(0,),
                    adapters=(rows,), uploads=uploads, sample_rows=(True,))  # fmt: skip


def test_a_step_waits_for_its_uploads_and_every_earlier_plans() -> None:
    clock = engine.Clock()
    host = model.HostModel(upload_bytes_per_s=1e9)
    ready = model.h100_ready(model.ATTN, 16)
    runner = engine.SimRunner(clock, model.H100, host, ready)
    runner.scheduler = Replies()  # type: ignore[assignment]
    upload_s = 2 * ready.lora_row_bytes / 1e9
    for a in (1, 2):
        runner.send(HostCopyReady(adapter_id=AdapterId(a), weights=0, rank=2, scaling=1.0))
    # plan 1 uses adapter 1 and prefetches adapter 2; plan 2 (rowless) uploads nothing
    prefetch = AdapterRows(AdapterId(2), (12, 13))
    runner.send(RunStep(plan=decode_plan(1, 1, (AdapterRows(AdapterId(1), (10, 11)), prefetch))))
    runner.send(RunStep(plan=decode_plan(2, 1)))
    clock.run(lambda: len(runner.steps) == 2 and not runner.busy)
    first, second = runner.steps
    step_s = model.H100.step_s(first.shape)
    assert first.end_s == pytest.approx(upload_s + step_s)  # waited for adapter 1 only
    # the second waits for the prefetch, which ended after the first step's own upload
    assert second.end_s == pytest.approx(max(first.end_s, 2 * upload_s) + step_s)
    assert [type(m) for m in runner.scheduler.msgs] == [StepDone, StepDone]  # type: ignore[attr-defined]


SMALL = many_sim.Workload(requests=24, concurrency=8, prompt_len=16, new_tokens=8)


def test_a_small_capped_run_finishes_every_request_deterministically() -> None:
    scenario = many_sim.scenarios()["zipf64_cap8"]._replace(arena_gib=4)
    first = many_sim.simulate(scenario, SMALL, check_invariants=True)
    again = many_sim.simulate(scenario, SMALL)
    assert first == again
    assert first["tokens"] == 24 * 8
    assert 1 <= first["adapters_per_decode_step"] <= 8
    assert first["decode_steps"] >= 7  # 8 tokens: a prefill step then 7 decode steps, at least


def test_the_thousand_adapter_run_reads_dropped_copies_back_from_disk() -> None:
    scenario = many_sim.scenarios()["zipf1000"]._replace(arena_gib=4)
    run = many_sim.simulate(scenario, SMALL._replace(requests=48), check_invariants=True)
    assert run["host_loads"] > 8  # the warm-up's names were dropped by the host cap at startup
    assert run["num_cold"] > 0
    assert run["tokens"] == 48 * 8


def test_capped_run_prediction_guards_the_admission_policy() -> None:
    """bench_many's zipf64_cap8 as replayed: the old rule (a starving request blocked every
    adapter request) predicted 2922 decode steps and 0.171 (measured 0.165 on the H100)."""
    result = many_sim.predict(["zipf64_cap8"])["zipf64_cap8"]
    assert result["decode_steps"] <= 1700
    assert result["ratio"] >= 0.29
    assert result["ttft_p50_s"] <= 2.0
