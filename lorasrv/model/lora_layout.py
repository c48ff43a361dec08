"""The LoRA layouts shared by the adapter loader and the row pool: fused modules and slices, one
adapter's weights per module, and the row layout (one rank-vector of an adapter across all layers
and modules) that host copies are packed into and the arena's rows hold.

Shapes and host-side packing only; nothing here touches a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lorasrv.model.arch import ModelArch

#: pool module -> the PEFT modules fused into it, in output order
POOL_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
#: PEFT module -> (pool module, slice index)
MODULE_SLICE: dict[str, tuple[str, int]] = {
    part: (pool_module, j)
    for pool_module, parts in POOL_MODULES.items()
    for j, part in enumerate(parts)
}


class PoolModuleShape(NamedTuple):
    in_features: int
    slice_sizes: tuple[int, ...]  # output width of each fused part

    @property
    def num_slices(self) -> int:
        return len(self.slice_sizes)

    @property
    def out_features(self) -> int:
        return sum(self.slice_sizes)

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        offsets = [0]
        for size in self.slice_sizes:
            offsets.append(offsets[-1] + size)
        return tuple(offsets)


def pool_module_shapes(arch: ModelArch) -> dict[str, PoolModuleShape]:
    hidden, inter = arch.hidden_size, arch.intermediate_size
    return {
        "qkv_proj": PoolModuleShape(hidden, (arch.q_size, arch.kv_size, arch.kv_size)),
        "o_proj": PoolModuleShape(arch.q_size, (hidden,)),
        "gate_up_proj": PoolModuleShape(hidden, (inter, inter)),
        "down_proj": PoolModuleShape(inter, (hidden,)),
    }


def pool_modules_for(target_modules: tuple[str, ...]) -> tuple[str, ...]:
    """Pool modules that get buffers: a fused module exists if any of its parts is targeted."""
    return tuple(
        name for name, parts in POOL_MODULES.items() if any(p in target_modules for p in parts)
    )


class LoraModuleWeights(NamedTuple):
    """One adapter's weights for one (layer, pool module), slices fused."""

    a: torch.Tensor  # [num_slices * rank, in_features]; slice j = rows j*rank:(j+1)*rank
    b: torch.Tensor  # [out_features, rank]; per-module scaling ratio folded in


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """One adapter read from its folder, per module (CPU tensors): what TP shards, then packs.

    Modules the adapter does not train are absent; fused slices it does not cover are zero.
    """

    rank: int  # max rank over modules; rows past a module's own rank are zero
    scaling: float  # the adapter's scaling, lora_alpha / r (rsLoRA: / sqrt(r))
    modules: dict[tuple[int, str], LoraModuleWeights]  # (layer, pool module) -> weights
    target_modules: tuple[str, ...]  # PEFT modules with weights, SUPPORTED_LORA_MODULES order
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return sum(
            w.a.numel() * w.a.element_size() + w.b.numel() * w.b.element_size()
            for w in self.modules.values()
        )


def _pad8(n: int) -> int:
    """Parts of a row start 16-byte aligned in half precision: multiples of 8 elements."""
    return -(-n // 8) * 8


class ModuleRows(NamedTuple):
    """Where one (layer, pool module) lies in a row: its A part, then its B part.

    A part: `num_slices * in_features` elements, row i of each slice's A, slices concatenated.
    B part: `out_features` elements, column i of the fused B (slice j at its slice offset).
    """

    a_offset: int
    b_offset: int
    shape: PoolModuleShape

    @property
    def a_elems(self) -> int:
        return self.shape.num_slices * self.shape.in_features

    @property
    def b_elems(self) -> int:
        return self.shape.out_features


@dataclass(frozen=True, slots=True)
class RowLayout:
    """The row: for each layer, for each pool module that exists, A part then B part, each
    padded to 8 elements. One row holds one rank-vector of one adapter everywhere."""

    modules: dict[tuple[int, str], ModuleRows]  # (layer, pool module) -> offsets
    row_elems: int


def row_layout(arch: ModelArch, target_modules: tuple[str, ...]) -> RowLayout:
    """The row layout for `arch` (a TP rank's shard arch under TP: ranks get equal rows)."""
    shapes = pool_module_shapes(arch)
    modules: dict[tuple[int, str], ModuleRows] = {}
    offset = 0
    for layer in range(arch.num_layers):
        for name in pool_modules_for(target_modules):
            shape = shapes[name]
            a_offset = offset
            b_offset = a_offset + _pad8(shape.num_slices * shape.in_features)
            offset = b_offset + _pad8(shape.out_features)
            modules[layer, name] = ModuleRows(a_offset, b_offset, shape)
    return RowLayout(modules, offset)


@dataclass(frozen=True, slots=True)
class HostAdapter:
    """An adapter's host copy, packed into its rows (`[rank, row_elems]`, pinned when CUDA
    exists): an upload is one copy per run of consecutive rows. Opaque to the engine, which
    reads `rank`, `scaling` and `num_bytes`."""

    rank: int  # rows the adapter needs
    scaling: float  # applied by the kernels per adapter; per-module ratios are folded into B
    rows: torch.Tensor  # [rank, row_elems]
    target_modules: tuple[str, ...]

    @property
    def num_bytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


def pack_rows(weights: AdapterWeights, layout: RowLayout, *, pin_memory: bool) -> HostAdapter:
    """Module-form weights -> their rows; everything the adapter does not train stays zero."""
    rank = weights.rank
    rows = torch.zeros(rank, layout.row_elems, dtype=weights.dtype, pin_memory=pin_memory)
    for key, module in weights.modules.items():
        place = layout.modules.get(key)
        if place is None:
            raise ValueError(f"layer {key[0]} {key[1]} has no place in the LoRA rows")
        shape = place.shape
        a = module.a.view(shape.num_slices, rank, shape.in_features).transpose(0, 1)
        rows[:, place.a_offset : place.a_offset + place.a_elems] = a.reshape(rank, -1)
        rows[:, place.b_offset : place.b_offset + place.b_elems] = module.b.T
    return HostAdapter(rank, weights.scaling, rows, weights.target_modules)


def unpack_module(host: HostAdapter, place: ModuleRows) -> LoraModuleWeights:
    """The inverse of `pack_rows` for one module (tests, and checks of what rows hold)."""
    shape, rank = place.shape, host.rank
    a = host.rows[:, place.a_offset : place.a_offset + place.a_elems]
    a = a.reshape(rank, shape.num_slices, shape.in_features).transpose(0, 1)
    b = host.rows[:, place.b_offset : place.b_offset + place.b_elems].T
    return LoraModuleWeights(a=a.reshape(-1, shape.in_features), b=b)


def row_runs(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first index, first row, length) of each run of consecutive ascending rows."""
    runs: list[tuple[int, int, int]] = []
    for i, row in enumerate(rows):
        if runs and row == runs[-1][1] + runs[-1][2]:
            first, start, length = runs[-1]
            runs[-1] = (first, start, length + 1)
        else:
            runs.append((i, row, 1))
    return runs
