"""A TP worker's ModelRunner that insists on the static decode path (the one CUDA graphs replay),
captured when on CUDA: a decode plan it cannot run there, or a CUDA runner without graphs, ends
the worker with an AssertionError, which the coordinator reports (TpWorkerError naming it). Used
through `TpRunner(runner_class=STATIC_DECODE_RUNNER)`."""

from __future__ import annotations

from typing import Any

from lorasrv.messages import StepPlan, StepResult
from lorasrv.model.runner import ModelRunner

STATIC_DECODE_RUNNER = "tests.tp.static_decode_runner:StaticDecodeRunner"


class StaticDecodeRunner(ModelRunner):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        assert self.decode is not None, "no static decode path under TP"
        if self.device.type == "cuda":
            assert self.decode.use_graphs, "no CUDA graphs under TP"
        assert self.tokens is None, "a TP worker keeps no device tokens: the coordinator fills"

    def step(self, plan: StepPlan) -> StepResult:
        if plan.is_decode:
            assert self.decode is not None
            assert self.decode.can_run(plan), f"decode step {plan.step_id} would run eagerly"
        return super().step(plan)
