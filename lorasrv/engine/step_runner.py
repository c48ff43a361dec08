"""The seam between the GPU runner actor and whatever runs the model (ModelRunner, FakeRunner).

Pure: no torch here, so the fakes and the actor tests never import it.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from lorasrv.ids import AdapterId, SlotId
from lorasrv.messages import RunnerReady, StepPlan, TokenLogprob


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
