"""The seam between the GPU runner actor and whatever runs the model (ModelRunner, FakeRunner).

Pure: no torch here, so the fakes and the actor tests never import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from lorasrv.ids import AdapterId, SlotId
from lorasrv.messages import HostCopyReady, RunnerReady, StepPlan, StepResult, TokenLogprob


class StepOutput(NamedTuple):
    """One entry per sampled row of the plan, in row order."""

    token_ids: list[int]
    logprobs: list[float]  # empty unless some row asked for logprobs
    top_logprobs: list[tuple[TokenLogprob, ...]]  # empty unless some row asked


class StepResultLike(Protocol):
    """What `StepRunner.step` returns: StepOutput or any NamedTuple with the same fields
    (the model package defines its own, as it must not import the engine)."""

    @property
    def token_ids(self) -> list[int]: ...

    @property
    def logprobs(self) -> list[float]: ...

    @property
    def top_logprobs(self) -> list[tuple[TokenLogprob, ...]]: ...


class StepRunner(Protocol):
    """Runs on the GPU runner's one thread; every method may block."""

    def ready(self) -> RunnerReady: ...

    def step(self, plan: StepPlan) -> StepResultLike: ...

    def load_slot(self, slot_id: SlotId, adapter_id: AdapterId, weights: object) -> None: ...

    def clear_slot(self, slot_id: SlotId) -> None: ...

    def shutdown(self) -> None: ...


class ArenaStepRunner(Protocol):
    """The runner seam once adapters live in arena rows (lora_core_contract.md section 3); it
    replaces StepRunner when the engine's planner lands. Every method may block; all run on the
    GPU runner's one thread, in inbox order."""

    def ready(self) -> RunnerReady: ...

    def step(self, plan: StepPlan) -> StepResult:
        """Uploads `plan.uploads` first (side stream), then runs the rows."""

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
