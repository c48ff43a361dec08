"""What the coordinator and the TP workers tell each other: commands, results, adapter layouts.

msgspec msgpack bytes, carried by torch.distributed (channel.py). No torch here.
"""

from __future__ import annotations

import msgspec

from lorasrv.messages import StepPlan, TokenLogprob


class ModuleShape(msgspec.Struct, frozen=True, array_like=True):
    """One (layer, pool module) of a rank's adapter shard, in packing order."""

    layer: int
    module: str
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]


class ShardLayout(msgspec.Struct, frozen=True, kw_only=True):
    """How one rank's flat adapter bytes split into modules; the same for every rank."""

    rank: int
    scaling: float
    target_modules: tuple[str, ...]
    dtype: str  # torch dtype name without the "torch." prefix
    modules: tuple[ModuleShape, ...]
    num_bytes: int


class TpStep(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    plan: StepPlan


class TpLoadSlot(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Followed by each worker's own shard bytes, sent point to point."""

    slot_id: int
    adapter_id: int
    layout: ShardLayout


class TpClearSlot(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    slot_id: int


class TpShutdown(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    pass


TpCommand = TpStep | TpLoadSlot | TpClearSlot | TpShutdown


class TpStepResult(msgspec.Struct, frozen=True, kw_only=True):
    """Rank 0's sampled tokens for one step, one entry per sampled row."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[tuple[TokenLogprob, ...]]
