"""The seam between the GPU runner actor and whatever runs the model (ModelRunner, TpRunner,
FakeRunner), and two small helpers for runners that finish each step before the next.

Pure: no torch here, so the fakes and the actor tests never import it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol

import msgspec

from lorasrv.ids import AdapterId, SeqId
from lorasrv.messages import HostCopyReady, RunnerReady, StepPlan, StepResult


class PendingStep(Protocol):
    """A launched step's result on its way to the host."""

    def result(self) -> StepResult:
        """Blocks until the step's tokens are on the host; may be called from another thread
        than the one that launched it, while later steps are being launched."""


class StepRunner(Protocol):
    """The runner seam: every method but `PendingStep.result` runs on the GPU runner's one
    thread, in inbox order. Probed through this protocol only (no getattr)."""

    def ready(self) -> RunnerReady: ...

    def launch(self, plan: StepPlan) -> PendingStep:
        """Uploads `plan.uploads` first (side stream), then queues the rows' compute, and returns
        without waiting for the tokens. Steps run in launch order, so a step reads everything an
        earlier one wrote (K/V, and the tokens its `device_inputs` rows take)."""

    def add_host_copy(self, copy: HostCopyReady) -> None:
        """Keep the host copy (and rank, scaling) for later uploads; no GPU work."""

    def drop_host_copy(self, adapter_id: AdapterId) -> None:
        """Forget the host copy; rank and scaling stay (its rows may still be resident)."""

    def make_adapter_loader(self) -> Callable[[str], object]:
        """A CPU-only, thread-safe loader: adapter folder -> host copy (HostCopyReady.weights)."""

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """Call `listener(cause)` (from any thread) if the runner fails while no step runs;
        a single-process runner never does and may ignore it."""

    def shutdown(self) -> None: ...


class DoneStep:
    """A step whose result is already on the host (a runner that waits for every step, or a
    step that samples nothing)."""

    __slots__ = ("_result",)

    def __init__(self, result: StepResult) -> None:
        self._result = result

    def result(self) -> StepResult:
        return self._result


class HostInputs:
    """For runners that return each step's tokens before they launch the next (TpRunner's
    coordinator, the fakes): the last token each sequence sampled, kept from the results, fills a
    plan's `device_inputs` rows on the host."""

    def __init__(self) -> None:
        self._last: dict[SeqId, int] = {}

    def resolve(self, plan: StepPlan) -> StepPlan:
        """`plan` with every device input replaced by its token (and `device_inputs` empty)."""
        for seq_id in plan.freed_seq_ids:
            self._last.pop(seq_id, None)
        if not any(plan.device_inputs):
            return plan
        input_ids = list(plan.input_ids)
        starts = itertools.accumulate(plan.query_lens, initial=0)
        rows = zip(plan.seq_ids, plan.device_inputs, plan.query_lens, starts, strict=False)
        for seq_id, is_device, query_len, start in rows:
            if not is_device:
                continue
            if query_len != 1 or seq_id not in self._last:
                raise ValueError(f"plan {plan.step_id}: seq {seq_id} has no sampled token to feed")
            input_ids[start] = self._last[seq_id]
        return msgspec.structs.replace(plan, input_ids=tuple(input_ids), device_inputs=())

    def record(self, plan: StepPlan, result: StepResult) -> None:
        """Remember the tokens `plan`'s sampled rows got."""
        sampled = itertools.compress(plan.seq_ids, plan.sample_rows)
        self._last.update(zip(sampled, result.token_ids, strict=True))
