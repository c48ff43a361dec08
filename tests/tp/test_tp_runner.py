"""TpRunner driven directly (PlanDriver, no engine) on a checkpoint that exercises the corners of
the sharding: one KV head over two ranks (replicated), a vocabulary that does not split evenly
(padded shards), q/k/v and o biases, tied embeddings; and a frozen worker detected as a hang."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest

from lorasrv.ids import AdapterId
from lorasrv.model.runner import ModelRunner
from lorasrv.tp.monitor import TpWorkerError
from lorasrv.tp.runner import TpRunner
from tests.model.plan_driver import PlanDriver
from tests.tp.conftest import PROMPTS, ROW_ADAPTERS, runner_options


def test_odd_shapes_give_tp1_tokens(odd_world: dict[str, Any]) -> None:
    """Each rank's shard in its own rows (the same row ids on every rank), uploaded by the plan;
    a dropped host copy leaves the rows in use; new rows for the same adapter re-upload."""
    options = runner_options(odd_world["base"])
    tp1 = ModelRunner(**options)
    driver1 = PlanDriver(tp1, lora_rows=16)
    driver1.add_adapter(1, tp1.make_adapter_loader()(str(odd_world["adapter"])))
    expected = driver1.generate(PROMPTS, ROW_ADAPTERS, max_new_tokens=8)
    base_only = driver1.generate(PROMPTS[1:2], [None], max_new_tokens=8)
    tp2 = TpRunner(tp_size=2, **options)
    try:
        driver2 = PlanDriver(tp2, lora_rows=16)
        weights = tp2.make_adapter_loader()(str(odd_world["adapter"]))
        assert weights.num_bytes == 2 * weights.buffers[0].numel()
        rows = driver2.add_adapter(1, weights)
        assert driver2.generate(PROMPTS, ROW_ADAPTERS, max_new_tokens=8) == expected
        tp2.drop_host_copy(AdapterId(1))  # the rows stay resident and usable
        assert driver2.generate(PROMPTS[1:2], [1], max_new_tokens=8) == expected[1:2]
        assert driver2.generate(PROMPTS[1:2], [None], max_new_tokens=8) == base_only
        # the adapter again, into other rows, counted at rank 10 (as a config's r may exceed
        # its tensors' rank): each worker zeroes the two rows past its shard
        others = [r for r in driver2.free_rows if r not in rows] + list(rows[:2])
        driver2.remove_adapter(1)
        driver2.add_adapter(2, weights, rows=others, rank=10)
        assert driver2.generate(PROMPTS, [None, 2, None, 2], max_new_tokens=8) == expected
    finally:
        tp2.shutdown()
    assert base_only[0] != expected[1], "the adapter changed nothing: the test would be vacuous"


def test_frozen_worker_is_reported_as_hung(odd_world: dict[str, Any]) -> None:
    runner = TpRunner(tp_size=2, heartbeat_timeout_s=3.0, **runner_options(odd_world["base"]))
    reported = threading.Event()
    causes: list[str] = []
    runner.on_failure(lambda cause: (causes.append(cause), reported.set()))
    try:
        os.kill(runner.worker_pids[0], signal.SIGSTOP)
        assert reported.wait(10), "no failure reported for a stopped worker"
        assert "tp worker 0" in causes[0]
        assert "no heartbeat" in causes[0]
        with pytest.raises(TpWorkerError, match="no heartbeat"):
            PlanDriver(runner).generate(PROMPTS[:1], max_new_tokens=1)
    finally:
        runner.shutdown()


def test_step_deadline_tightens_once_warm(odd_world: dict[str, Any]) -> None:
    """A worker stuck inside a collective keeps beating; the step deadline is what catches it, so
    after the cold steps (kernel compiles) it must drop to the warm one."""
    from lorasrv.tp.runner import NUM_COLD_STEPS

    runner = TpRunner(tp_size=2, warm_step_timeout_s=7.0, **runner_options(odd_world["base"]))
    used: list[float] = []
    guard = runner._guard

    def recording_guard(what: str, timeout_s: float) -> Any:
        if what.startswith("step"):
            used.append(timeout_s)
        return guard(what, timeout_s)

    runner._guard = recording_guard  # type: ignore[method-assign]
    try:
        PlanDriver(runner).generate(PROMPTS[:1], max_new_tokens=NUM_COLD_STEPS + 3)
    finally:
        runner.shutdown()
    assert len(used) > NUM_COLD_STEPS
    assert set(used[:NUM_COLD_STEPS]) == {runner.step_timeout_s}
    assert set(used[NUM_COLD_STEPS:]) == {7.0}
