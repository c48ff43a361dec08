"""Stacked per-slot LoRA buffers on the device: slot loading/clearing and per-step batch info.

A slot is an index into the stacks, never a pointer. Knows nothing of adapter names or policy.
"""

from __future__ import annotations

import logging

import torch
from lorasrv_kernels import SlotBatchInfo

from lorasrv.ids import AdapterId, SlotId
from lorasrv.model.arch import ModelArch
from lorasrv.model.llama import LlamaModel
from lorasrv.model.lora_layout import AdapterWeights, pool_module_shapes, pool_modules_for

logger = logging.getLogger(__name__)


class LoraPool:
    """Per layer and pool module: A `[slots, slices*max_rank, in]`, B `[slots, out, max_rank]`."""

    def __init__(
        self,
        arch: ModelArch,
        *,
        num_slots: int,
        max_rank: int,
        target_modules: tuple[str, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.target_modules = target_modules
        self.pool_modules = pool_modules_for(target_modules)
        self.shapes = pool_module_shapes(arch)
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        for layer in range(arch.num_layers):
            for name in self.pool_modules:
                shape = self.shapes[name]
                self.a[layer, name] = torch.zeros(
                    num_slots,
                    shape.num_slices * max_rank,
                    shape.in_features,
                    dtype=dtype,
                    device=device,
                )
                self.b[layer, name] = torch.zeros(
                    num_slots, shape.out_features, max_rank, dtype=dtype, device=device
                )
        self.slot_rank = torch.zeros(num_slots, dtype=torch.int32, device=device)  # 0 = empty
        self.slot_scaling = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.slot_adapter: list[AdapterId | None] = [None] * num_slots

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.a.values(), *self.b.values()])

    def attach(self, model: LlamaModel) -> None:
        """Point each targeted linear layer at its stacks.

        Each A stack moves under its base weight, into one `[W; A[0]; A[1]; ...]` buffer, so
        that small steps get the shrink out of the base GEMM (`LoraLinear.forward`). The old
        weight is freed as soon as it is copied: one module's weight is transient memory.
        """
        for layer, name, linear in model.lora_linears():
            key = (layer, name)
            if key not in self.a:
                continue
            a = self.a[key]  # [num_slots, num_slices * max_rank, in]
            out_total, in_features = linear.weight.shape
            if a.shape[2] != in_features:
                raise ValueError(f"layer {layer} {name}: A width {a.shape[2]} != {in_features}")
            stacked = torch.empty(
                out_total + a.shape[0] * a.shape[1],
                in_features,
                dtype=linear.weight.dtype,
                device=linear.weight.device,
            )
            stacked[:out_total].copy_(linear.weight)
            stacked[out_total:].copy_(a.view(-1, in_features))
            linear.attach_lora(stacked, self.b[key], self.num_slots)
            assert linear.a_stack is not None
            self.a[key] = linear.a_stack

    def load_slot(self, slot_id: SlotId, adapter_id: AdapterId, weights: AdapterWeights) -> None:
        """Copy an adapter into a slot; everything it does not cover is zeroed (no stale data)."""
        self._check_slot(slot_id)
        if not isinstance(weights, AdapterWeights):
            raise TypeError(f"load_slot: expected AdapterWeights, got {type(weights).__name__}")
        if weights.rank > self.max_rank:
            raise ValueError(
                f"adapter {adapter_id}: rank {weights.rank} > pool max rank {self.max_rank}"
            )
        extra = [m for m in weights.target_modules if m not in self.target_modules]
        if extra:
            raise ValueError(f"adapter {adapter_id}: modules {extra} have no pool buffers")
        rank = weights.rank
        for key, a_all in self.a.items():
            shape = self.shapes[key[1]]
            a_slot = a_all[slot_id].view(shape.num_slices, self.max_rank, shape.in_features)
            b_slot = self.b[key][slot_id]  # [out_total, max_rank]
            module = weights.modules.get(key)
            if module is None:
                a_slot.zero_()
                b_slot.zero_()
                continue
            # NOTE: non_blocking from pinned memory is safe even if the sender drops the host
            # copy: the caching host allocator keeps the block until the copy has finished.
            a_slot[:, :rank].copy_(
                module.a.view(shape.num_slices, rank, shape.in_features), non_blocking=True
            )
            a_slot[:, rank:].zero_()
            b_slot[:, :rank].copy_(module.b, non_blocking=True)
            b_slot[:, rank:].zero_()
        self.slot_rank[slot_id] = rank
        self.slot_scaling[slot_id] = weights.scaling
        self.slot_adapter[slot_id] = adapter_id
        logger.debug("slot %d <- adapter %d (rank %d)", slot_id, adapter_id, rank)

    def clear_slot(self, slot_id: SlotId) -> None:
        """Rank 0 makes the kernels skip the slot; the buffers are zeroed too, for hygiene."""
        self._check_slot(slot_id)
        for key, a_all in self.a.items():
            a_all[slot_id].zero_()
            self.b[key][slot_id].zero_()
        self.slot_rank[slot_id] = 0
        self.slot_scaling[slot_id] = 0.0
        self.slot_adapter[slot_id] = None

    def batch_info(
        self, seg_indptr: torch.Tensor, seg_slot: torch.Tensor, max_seg_len: int
    ) -> SlotBatchInfo:
        """The step's segments (device views of the packed upload) with the slot tables."""
        return SlotBatchInfo(
            seg_indptr=seg_indptr,
            seg_slot=seg_slot,
            slot_rank=self.slot_rank,
            slot_scaling=self.slot_scaling,
            max_seg_len=max_seg_len,
        )

    def _check_slot(self, slot_id: int) -> None:
        if not 0 <= slot_id < self.num_slots:
            raise ValueError(f"slot {slot_id} out of range [0, {self.num_slots})")
