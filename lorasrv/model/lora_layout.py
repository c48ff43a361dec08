"""The LoRA pool layout shared by the adapter loader and the slot pool: fused modules and slices.

Shapes only; no tensors are allocated here.
"""

from __future__ import annotations

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
    """One adapter's weights for one (layer, pool module), already in the pool layout."""

    a: torch.Tensor  # [num_slices * rank, in_features]; slice j = rows j*rank:(j+1)*rank
    b: torch.Tensor  # [out_features, rank]; per-module scaling ratio folded in


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """Host copy of one adapter (CPU tensors, pinned when CUDA exists). Opaque to the engine.

    Modules the adapter does not train are absent; fused slices it does not cover are zero.
    """

    rank: int  # max rank over modules; rows past a module's own rank are zero
    scaling: float  # the slot scaling, lora_alpha / r (rsLoRA: / sqrt(r))
    modules: dict[tuple[int, str], LoraModuleWeights]  # (layer, pool module) -> weights
    target_modules: tuple[str, ...]  # PEFT modules with weights, SUPPORTED_LORA_MODULES order
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return sum(
            w.a.numel() * w.a.element_size() + w.b.numel() * w.b.element_size()
            for w in self.modules.values()
        )
