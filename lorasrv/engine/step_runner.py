"""The seam between the GPU runner actor and whatever runs the model (ModelRunner, FakeRunner).

Pure: no torch here, so the fakes and the actor tests never import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from lorasrv.ids import AdapterId
from lorasrv.messages import HostCopyReady, RunnerReady, StepPlan, StepResult


class StepRunner(Protocol):
    """The runner seam: every method may block; all run on the GPU runner's one thread, in
    inbox order. Probed through this protocol only (no getattr)."""

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
