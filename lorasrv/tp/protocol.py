"""What the coordinator and the TP workers tell each other: commands, results, host-copy headers.

msgspec msgpack bytes, carried by torch.distributed (channel.py). No torch here.
"""

from __future__ import annotations

import msgspec

from lorasrv.messages import StepPlan


class TpStep(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Run one plan (its uploads first); rank 0 answers with a `messages.StepResult`."""

    plan: StepPlan


class TpAddHostCopy(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An adapter's host copy: followed by each worker's own packed rows, sent point to point
    (`[rows, row_elems]` of `dtype`, `num_bytes` each; every rank's rows have one size)."""

    adapter_id: int
    rank: int  # the rows plans give it (HostCopyReady.rank; >= the packed rows)
    scaling: float
    dtype: str  # torch dtype name without the "torch." prefix
    row_elems: int
    target_modules: tuple[str, ...]
    num_bytes: int


class TpDropHostCopy(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    adapter_id: int


class TpShutdown(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    pass


TpCommand = TpStep | TpAddHostCopy | TpDropHostCopy | TpShutdown
