"""What the coordinator tells the TP workers besides steps: host-copy headers, drops, shutdown.

msgspec msgpack bytes in shared memory (shm_channel.py, kind MESSAGE). Steps and their results
are not here: they travel as flat words (plan_codec.py). No torch here.
"""

from __future__ import annotations

import msgspec


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


TpCommand = TpAddHostCopy | TpDropHostCopy | TpShutdown
