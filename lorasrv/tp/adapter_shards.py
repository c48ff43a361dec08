"""Adapter host copies under TP: each rank's S-LoRA shard packed into that rank's rows, as one flat
byte buffer per rank, and back.

The coordinator packs once, when the adapter loads into host memory (a loader thread), and ships
each worker its buffer when the runner gets the host copy; workers keep it (pinned on CUDA) for
their uploads. Never touches a device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasrv.model.arch import ModelArch
from lorasrv.model.lora_layout import AdapterWeights, HostAdapter, pack_rows, row_layout
from lorasrv.model.sharding import Shard, shard_adapter, shard_arch
from lorasrv.tp.protocol import TpAddHostCopy


@dataclass(frozen=True, slots=True)
class TpAdapterWeights:
    """What the adapter manager hands the runner for one adapter under TP (opaque to it)."""

    rank: int
    scaling: float
    target_modules: tuple[str, ...]
    dtype: torch.dtype
    row_elems: int
    buffers: tuple[torch.Tensor, ...]  # per TP rank, uint8 `[rank * row_elems * element size]`

    @property
    def num_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def header(self, adapter_id: int, rank: int) -> TpAddHostCopy:
        """What the workers need to rebuild their host copy; `rank`: the rows plans give it."""
        return TpAddHostCopy(
            adapter_id=adapter_id,
            rank=rank,
            scaling=self.scaling,
            dtype=str(self.dtype).removeprefix("torch."),
            row_elems=self.row_elems,
            target_modules=self.target_modules,
            num_bytes=self.buffers[0].numel(),
        )


def pack_shards(
    weights: AdapterWeights, arch: ModelArch, tp_size: int, target_modules: tuple[str, ...]
) -> TpAdapterWeights:
    """Cut an adapter into every rank's shard, each packed into that rank's row layout."""
    buffers, widths = [], set()
    for rank in range(tp_size):
        shard = Shard(rank, tp_size)
        layout = row_layout(shard_arch(arch, shard), target_modules)
        host = pack_rows(shard_adapter(weights, arch, shard), layout, pin_memory=False)
        widths.add(layout.row_elems)
        buffers.append(host.rows.reshape(-1).view(torch.uint8))
    # NOTE: one header travels in the broadcast command; every rank's rows must share it.
    assert len(widths) == 1, "rank shards differ in row size"
    return TpAdapterWeights(
        rank=weights.rank,
        scaling=weights.scaling,
        target_modules=weights.target_modules,
        dtype=weights.dtype,
        row_elems=widths.pop(),
        buffers=tuple(buffers),
    )


def unpack_shard(header: TpAddHostCopy, data: torch.Tensor, *, pin_memory: bool) -> HostAdapter:
    """A worker's received bytes -> its host copy (a view of `data`, or a pinned copy)."""
    dtype = getattr(torch, header.dtype)
    assert isinstance(dtype, torch.dtype), header.dtype
    rows = data.view(dtype).view(-1, header.row_elems)
    if pin_memory:
        rows = rows.pin_memory()
    return HostAdapter(rows.shape[0], header.scaling, rows, header.target_modules)
