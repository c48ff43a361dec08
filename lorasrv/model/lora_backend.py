"""LoRA backends: the object that computes a step's adapter deltas and owns its LoRA metadata.

A backend (torch reference or Triton) builds the metadata once per step from the plan's segments and
says what it supports (CUDA graphs, the fused gate/up activation); callers ask it, never compare
functions. Knows the arena's rows only through `ModuleLora` views; never reads a StepPlan field
other than the LoRA ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Protocol

import lorasrv_kernels
import torch
import torch.nn.functional as F
from lorasrv_kernels import (
    LoraBatchBuffers,
    LoraBatchInfo,
    lora_reference,
    prepare_lora_batch_info,
)

from lorasrv.ids import AdapterId
from lorasrv.messages import StepPlan
from lorasrv.model.lora_pool import ModuleLora


class AdapterInfo(NamedTuple):
    """What the kernels need per adapter besides its rows."""

    rank: int
    scaling: float


class LoraSegments(NamedTuple):
    """A step's LoRA segments on the host: runs of consecutive rows with one adapter, covering
    every row of the step (base-model runs are segments without rows)."""

    seg_lens: list[int]  # tokens per segment
    seg_rows: list[tuple[int, ...]]  # each segment's adapter rows (len == its rank); () = base
    seg_scaling: list[float]
    seg_adapters: Sequence[int] = ()  # each segment's index into plan.adapters; -1 = base
    # each segment's first column in a stacked `[W; A_hot]` GEMM's shrink (hot_cache.py); None
    # = the row kernels' shrink
    seg_v_col: Sequence[int] | None = None

    @property
    def num_row_entries(self) -> int:
        return sum(len(rows) for rows in self.seg_rows)


def lora_segments(
    plan: StepPlan, query_lens: Sequence[int], adapters: Mapping[AdapterId, AdapterInfo]
) -> LoraSegments | None:
    """Segments of a plan (`query_lens`: tokens per row, as the step runs them); None when every
    row is base. Unsorted rows are still correct, with more segments."""
    if all(index < 0 for index in plan.lora_adapters):
        return None
    seg_lens: list[int] = []
    seg_rows: list[tuple[int, ...]] = []
    seg_scaling: list[float] = []
    seg_adapters: list[int] = []
    current: int | None = None
    for index, num_tokens in zip(plan.lora_adapters, query_lens, strict=True):
        if index != current:
            current = index
            seg_lens.append(0)
            seg_adapters.append(max(index, -1))
            if index < 0:
                seg_rows.append(())
                seg_scaling.append(0.0)
            else:
                entry = plan.adapters[index]
                seg_rows.append(entry.rows)
                seg_scaling.append(adapters[entry.adapter_id].scaling)
        seg_lens[-1] += num_tokens
    return LoraSegments(seg_lens, seg_rows, seg_scaling, seg_adapters)


class LoraBackend(Protocol):
    """Runs a step's LoRA-targeted modules over arena rows, from metadata it builds itself.

    Every LoRA-targeted module's compute goes through it (`linear`, `gate_up_act`), base GEMM
    included, so a backend may choose per step how the delta is formed (e.g. a shrink folded
    into the base GEMM); callers only ask what it supports.
    """

    name: str
    # Metadata stays on the device and no op reads it back: a decode step can be captured.
    supports_cuda_graphs: bool
    # `gate_up_act` adds gate/up's delta inside the activation (no separate expand).
    supports_fused_act: bool

    def prepare(self, segments: LoraSegments, device: torch.device) -> LoraBatchInfo:
        """An eager step's metadata, sized exactly."""

    def static_buffers(
        self, *, max_tokens: int, max_row_entries: int, device: torch.device
    ) -> LoraBatchBuffers:
        """Metadata tensors that never move, refilled each step (CUDA-graph decode)."""

    def linear(
        self,
        info: LoraBatchInfo,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        module: ModuleLora,
    ) -> torch.Tensor:
        """`x Wᵀ + b` plus each token's adapter delta: `[num_tokens, out_total]`."""

    def gate_up_act(
        self, info: LoraBatchInfo, x: torch.Tensor, weight: torch.Tensor, module: ModuleLora
    ) -> torch.Tensor | None:
        """`silu(gate) * up` of gate/up (delta included), or None when this backend does not
        fuse it (the caller runs `linear` and the activation)."""

    def shrink(self, info: LoraBatchInfo, x: torch.Tensor, module: ModuleLora) -> torch.Tensor:
        """`v [num_tokens, num_slices * max_rank]` float32: x against each token's A rows."""

    def expand(
        self, info: LoraBatchInfo, v: torch.Tensor, y: torch.Tensor, module: ModuleLora
    ) -> None:
        """`y += scaling * v Btᵀ` per segment, in place."""


class LoraStep(NamedTuple):
    """A step's LoRA: the backend and the metadata it built; absent when every row is base."""

    backend: LoraBackend
    info: LoraBatchInfo

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module: ModuleLora
    ) -> torch.Tensor:
        return self.backend.linear(self.info, x, weight, bias, module)

    def gate_up_act(
        self, x: torch.Tensor, weight: torch.Tensor, module: ModuleLora
    ) -> torch.Tensor | None:
        return self.backend.gate_up_act(self.info, x, weight, module)

    def shrink(self, x: torch.Tensor, module: ModuleLora) -> torch.Tensor:
        return self.backend.shrink(self.info, x, module)

    def expand(self, v: torch.Tensor, y: torch.Tensor, module: ModuleLora) -> None:
        self.backend.expand(self.info, v, y, module)


def _num_slices(module: ModuleLora) -> int:
    return len(module.slice_offsets) - 1


class _Metadata:
    """Metadata building, the same for every backend: what differs is the ops."""

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank  # v's columns per slice

    def prepare(self, segments: LoraSegments, device: torch.device) -> LoraBatchInfo:
        return prepare_lora_batch_info(
            segments.seg_lens,
            segments.seg_rows,
            segments.seg_scaling,
            max_rank=self.max_rank,
            device=device,
            seg_v_col=segments.seg_v_col,
        )

    def static_buffers(
        self, *, max_tokens: int, max_row_entries: int, device: torch.device
    ) -> LoraBatchBuffers:
        return LoraBatchBuffers(
            max_tokens=max_tokens,
            max_segments=max_tokens,  # worst case: every row its own adapter
            max_row_entries=max_row_entries,
            max_rank=self.max_rank,
            device=device,
        )


class _Ops(Protocol):
    """The op set a backend runs: `lorasrv_kernels.lora_reference` or the Triton kernels (same
    names and signatures)."""

    def lora_apply(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        a_rows: torch.Tensor,
        bt_rows: torch.Tensor,
        info: LoraBatchInfo,
        slice_offsets: tuple[int, ...],
    ) -> None: ...

    def lora_shrink(
        self, x: torch.Tensor, a_rows: torch.Tensor, info: LoraBatchInfo, num_slices: int
    ) -> torch.Tensor: ...

    def lora_expand(
        self,
        v: torch.Tensor,
        bt_rows: torch.Tensor,
        y: torch.Tensor,
        info: LoraBatchInfo,
        slice_offsets: tuple[int, ...],
    ) -> None: ...

    def lora_silu_mul(
        self, gate_up: torch.Tensor, v: torch.Tensor, bt_rows: torch.Tensor, info: LoraBatchInfo
    ) -> torch.Tensor: ...

    def lora_expand_cols(
        self,
        v: torch.Tensor,
        bt_rows: torch.Tensor,
        y: torch.Tensor,
        info: LoraBatchInfo,
        slice_offsets: tuple[int, ...],
        slice_stride: int,
    ) -> None: ...

    def lora_silu_mul_cols(
        self,
        gate_up: torch.Tensor,
        v: torch.Tensor,
        bt_rows: torch.Tensor,
        info: LoraBatchInfo,
        slice_stride: int,
    ) -> torch.Tensor: ...


class OpsBackend(_Metadata):
    """A backend over one op set; what it supports is fixed per instance."""

    def __init__(
        self,
        name: str,
        ops: _Ops,
        *,
        max_rank: int,
        supports_cuda_graphs: bool,
        supports_fused_act: bool,
    ) -> None:
        super().__init__(max_rank)
        self.name = name
        self.ops = ops
        self.supports_cuda_graphs = supports_cuda_graphs
        self.supports_fused_act = supports_fused_act

    def linear(
        self,
        info: LoraBatchInfo,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        module: ModuleLora,
    ) -> torch.Tensor:
        y = F.linear(x, weight, bias)  # [num_tokens, out_total]
        self.ops.lora_apply(x, y, module.a_rows, module.bt_rows, info, module.slice_offsets)
        return y

    def gate_up_act(
        self, info: LoraBatchInfo, x: torch.Tensor, weight: torch.Tensor, module: ModuleLora
    ) -> torch.Tensor | None:
        if not self.supports_fused_act:
            return None
        v = self.ops.lora_shrink(x, module.a_rows, info, _num_slices(module))
        return self.ops.lora_silu_mul(F.linear(x, weight), v, module.bt_rows, info)

    def shrink(self, info: LoraBatchInfo, x: torch.Tensor, module: ModuleLora) -> torch.Tensor:
        return self.ops.lora_shrink(x, module.a_rows, info, _num_slices(module))

    def expand(
        self, info: LoraBatchInfo, v: torch.Tensor, y: torch.Tensor, module: ModuleLora
    ) -> None:
        self.ops.lora_expand(v, module.bt_rows, y, info, module.slice_offsets)


def make_lora_backend(name: str, device: torch.device, max_rank: int) -> LoraBackend:
    """ "torch" = the plain-torch reference (any device), "triton" = the kernels, "auto" =
    Triton on CUDA, torch elsewhere. `max_rank`: the largest adapter rank the step may hold."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        # The reference reads segment bounds back to the host: no graphs, and no fused act
        # (it would only be the unfused ops again).
        return OpsBackend(
            "torch",
            lora_reference,
            max_rank=max_rank,
            supports_cuda_graphs=False,
            supports_fused_act=False,
        )
    if name == "triton":
        return OpsBackend(
            "triton",
            lorasrv_kernels,
            max_rank=max_rank,
            supports_cuda_graphs=True,
            supports_fused_act=False,  # NOTE: until measured on the row layout (see docs)
        )
    raise ValueError(f"lora_backend {name!r} not supported; use torch or triton")
