"""Adapter host copies under TP: one flat byte buffer per rank (its S-LoRA shard), and back.

The coordinator packs once, when the adapter loads into host memory (a loader thread); each
worker unpacks the bytes it receives into AdapterWeights views. Never touches a device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorasrv.model.arch import ModelArch
from lorasrv.model.lora_layout import AdapterWeights, LoraModuleWeights
from lorasrv.model.sharding import Shard, shard_adapter
from lorasrv.tp.protocol import ModuleShape, ShardLayout


@dataclass(frozen=True, slots=True)
class TpAdapterWeights:
    """What the adapter manager holds for one adapter under TP (opaque to it)."""

    layout: ShardLayout
    buffers: tuple[torch.Tensor, ...]  # per rank, uint8 [layout.num_bytes]

    @property
    def num_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)


def pack_shards(weights: AdapterWeights, arch: ModelArch, tp_size: int) -> TpAdapterWeights:
    """Cut an adapter into every rank's shard, each packed into one contiguous byte buffer."""
    layouts, buffers = [], []
    for rank in range(tp_size):
        shard = shard_adapter(weights, arch, Shard(rank, tp_size))
        keys = sorted(shard.modules)
        parts = [t for key in keys for t in (shard.modules[key].a, shard.modules[key].b)]
        flat = torch.cat([t.reshape(-1) for t in parts]) if parts else torch.empty(0)
        data = flat.to(weights.dtype).view(torch.uint8)
        shapes = tuple(
            ModuleShape(
                layer=layer,
                module=module,
                a_shape=_pair(shard.modules[layer, module].a),
                b_shape=_pair(shard.modules[layer, module].b),
            )
            for layer, module in keys
        )
        layouts.append(
            ShardLayout(
                rank=weights.rank,
                scaling=weights.scaling,
                target_modules=weights.target_modules,
                dtype=str(weights.dtype).removeprefix("torch."),
                modules=shapes,
                num_bytes=data.numel(),
            )
        )
        buffers.append(data)
    # NOTE: one layout travels in the broadcast command; every rank's shard must share it.
    assert all(layout == layouts[0] for layout in layouts), "rank shards differ in shape"
    return TpAdapterWeights(layout=layouts[0], buffers=tuple(buffers))


def unpack_shard(layout: ShardLayout, data: torch.Tensor) -> AdapterWeights:
    """A rank's received bytes -> AdapterWeights whose tensors are views of `data`."""
    dtype = getattr(torch, layout.dtype)
    assert isinstance(dtype, torch.dtype), layout.dtype
    values = data.view(dtype)
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    offset = 0
    for shape in layout.modules:
        a_numel = shape.a_shape[0] * shape.a_shape[1]
        b_numel = shape.b_shape[0] * shape.b_shape[1]
        a = values[offset : offset + a_numel].view(shape.a_shape)
        b = values[offset + a_numel : offset + a_numel + b_numel].view(shape.b_shape)
        modules[shape.layer, shape.module] = LoraModuleWeights(a=a, b=b)
        offset += a_numel + b_numel
    return AdapterWeights(
        rank=layout.rank,
        scaling=layout.scaling,
        modules=modules,
        target_modules=layout.target_modules,
        dtype=dtype,
    )


def _pair(t: torch.Tensor) -> tuple[int, int]:
    rows, cols = t.shape
    return int(rows), int(cols)
