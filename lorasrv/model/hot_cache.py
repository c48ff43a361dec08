"""The runner's hot A cache: per LoRA-targeted linear one stacked buffer `[W; A_hot]` whose hot
rows hold a few adapters' A rows, copied from their arena rows, so a step whose adapters all fit
gets the base output and every adapter's shrink from one GEMM (`HotBackend`), and the expand
reads each segment's columns of that GEMM's output (`lora_expand_cols`).

Runner-local: the planner and the messages know nothing of it. The runner uses it for a decode
step (CUDA graph or eager; lora_runtime.py keeps prefill and mixed steps on the row kernels) iff
it is small (`HOT_MAX_TOKENS`) and the step's adapters fit the hot rows together; else the row
kernels. B is never copied (the expand reads it from the arena). An entry is refreshed when
the arena rows it came from were written since (an upload), or the adapter now has other rows.
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F
from lorasrv_kernels import LoraBatchInfo

from lorasrv.ids import AdapterId
from lorasrv.messages import StepPlan
from lorasrv.model.hot_slots import HotEntry, HotSlots
from lorasrv.model.llama import LlamaModel
from lorasrv.model.lora_backend import LoraBackend, LoraSegments, OpsBackend
from lorasrv.model.lora_layout import RowLayout
from lorasrv.model.lora_pool import HotModule, LoraPool, ModuleLora
from lorasrv.model.parallel import RowParallelLoraLinear
from lorasrv.model.uploads import Uploader

# Steps up to this many tokens may run stacked (the slot design's stacked GEMM measured ahead of
# the two-op path up to 2,048 tokens on an H200; the default prefill chunk).
HOT_MAX_TOKENS: Final = 2048
# The cost rule: hot rows whose extra GEMM bytes stay within this share of a layer's base
# weights, in [HOT_MIN_ROWS, HOT_MAX_ROWS], a multiple of 16. Every hot-path step reads all of
# them, used or not. The floor holds 8 adapters of rank 16 (Llama-3-8B, all modules: 128 rows =
# 2.3% of W per layer, about 0.1 ms of a 5 ms weight read).
HOT_BYTES_SHARE: Final = 0.025
HOT_MIN_ROWS: Final = 128
HOT_MAX_ROWS: Final = 256


def hot_rows_for(model: LlamaModel, layout: RowLayout) -> int:
    """The cost rule's hot rows for this model and row layout (see HOT_BYTES_SHARE)."""
    weight = sum(lin.weight.numel() for layer, _, lin in model.lora_linears() if layer == 0)
    a_elems = sum(p.a_elems for (layer, _), p in layout.modules.items() if layer == 0)
    rows = int(HOT_BYTES_SHARE * weight / a_elems) // 16 * 16 if a_elems else 0
    return min(max(rows, HOT_MIN_ROWS), HOT_MAX_ROWS)


class HotBackend(OpsBackend):
    """A rows backend's ops, with each targeted linear's GEMM over its stacked buffer: the
    shrink comes out of the base GEMM, the expand reads the step's columns of it. Modules
    without a stacked buffer, and TP's separate shrink/expand, run the row ops."""

    def linear(
        self,
        info: LoraBatchInfo,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        module: ModuleLora,
    ) -> torch.Tensor:
        hot = module.hot
        if hot is None:
            return super().linear(info, x, weight, bias, module)
        out = weight.shape[0]
        # The caller's bias decides (a TP rank may leave a row-parallel bias to rank 0 alone).
        wide = F.linear(x, hot.stacked, None if bias is None else hot.bias)  # [tokens, out + S*H]
        y = wide[:, :out]
        self.ops.lora_expand_cols(wide[:, out:], module.bt_rows, y, info, module.slice_offsets,
                                  hot.hot)  # fmt: skip
        return y

    def gate_up_act(
        self, info: LoraBatchInfo, x: torch.Tensor, weight: torch.Tensor, module: ModuleLora
    ) -> torch.Tensor | None:
        hot = module.hot
        if hot is None or not self.supports_fused_act:
            return super().gate_up_act(info, x, weight, module)
        out = weight.shape[0]
        wide = F.linear(x, hot.stacked)
        return self.ops.lora_silu_mul_cols(wide[:, :out], wide[:, out:], module.bt_rows, info,
                                           hot.hot)  # fmt: skip


def _stack(weight: torch.Tensor, bias: torch.Tensor | None, num_slices: int, hot: int
           ) -> HotModule:  # fmt: skip
    out, in_features = weight.shape
    # Zeros: hot rows no adapter holds never hold NaN (their columns are never read anyway).
    stacked = weight.new_zeros(out + num_slices * hot, in_features)
    stacked[:out].copy_(weight)
    if bias is not None:
        bias = torch.cat([bias, bias.new_zeros(num_slices * hot)])
    return HotModule(stacked, bias, hot)


class HotCache:
    """The stacked buffers (each targeted linear's weight moves into its own), which adapters
    they hold (`HotSlots`), and the copies that bring an adapter's A rows in."""

    def __init__(
        self, model: LlamaModel, layout: RowLayout, backend: OpsBackend, *, num_rows: int
    ) -> None:
        self.num_rows = num_rows
        self.modules: dict[tuple[int, str], HotModule] = {}
        self.num_bytes = 0  # the hot rows' (the weights moved in are not extra)
        device = None
        for layer, name, linear in model.lora_linears():
            place = layout.modules.get((layer, name))
            # NOTE: a row-parallel linear's output goes to an all-reduce, which wants it
            # contiguous (a stacked GEMM's output window is not): TP's o/down run the row ops.
            if place is None or isinstance(linear, RowParallelLoraLinear):
                continue
            hot = _stack(linear.weight, linear.bias, place.shape.num_slices, num_rows)
            linear.weight = hot.stacked[: linear.weight.shape[0]]  # the old weight is freed
            self.modules[layer, name] = hot
            device = hot.stacked.device
            extra = place.shape.num_slices * num_rows * (place.shape.in_features + 1)
            self.num_bytes += extra * hot.stacked.element_size()
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()  # the old weights' blocks, before the arena is sized
        self.slots = HotSlots(num_rows)
        self.backend = HotBackend(
            backend.name + "+hot",
            backend.ops,
            max_rank=backend.max_rank,
            supports_cuda_graphs=backend.supports_cuda_graphs,
            supports_fused_act=True,  # NOTE: the one-launch activation, as the slot design's
        )
        self._pool: LoraPool | None = None
        self._uploader: Uploader | None = None
        self.num_steps = 0  # steps run stacked
        self.num_fills = 0  # adapters copied in

    def attach(self, pool: LoraPool, uploader: Uploader) -> None:
        """The arena's rows to copy from, and the uploads that make copies stale."""
        self._pool, self._uploader = pool, uploader

    def place(self, plan: StepPlan, segments: LoraSegments, num_tokens: int) -> LoraSegments | None:
        """The step's segments with their hot columns when it runs stacked (its adapters copied
        in now where needed: the copies are queued on the current stream, after the step's
        uploads were waited for); None when it runs on the row kernels."""
        if num_tokens > HOT_MAX_TOKENS or self._uploader is None:
            return None
        wanted: dict[AdapterId, tuple[int, ...]] = {}
        for index in segments.seg_adapters:
            if index >= 0:
                entry = plan.adapters[index]
                wanted[entry.adapter_id] = entry.rows
        placement = self.slots.place(wanted, self._uploader.num_uploads, self._is_fresh)
        if placement is None:
            return None
        if placement.fills:
            self._fill(placement.fills)
        self.num_steps += 1
        starts = placement.starts
        v_col = [starts[plan.adapters[i].adapter_id] if i >= 0 else 0
                 for i in segments.seg_adapters]  # fmt: skip
        return segments._replace(seg_v_col=v_col)

    def _is_fresh(self, entry: HotEntry) -> bool:
        assert self._uploader is not None
        written = self._uploader.row_writes
        return all(written.get(row, 0) <= entry.serial for row in entry.rows)

    def _fill(self, fills: list[tuple[int, tuple[int, ...]]]) -> None:
        """Copy each (first hot row, arena rows)'s A rows into every stacked buffer: two
        launches per module for all the step's new adapters."""
        assert self._pool is not None
        src = [row for _, rows in fills for row in rows]
        dst = [start + i for start, rows in fills for i in range(len(rows))]
        index = torch.tensor([src, dst], dtype=torch.int64)
        device = self._pool.rows.device
        if device.type == "cuda":  # NOTE: pinned + non-blocking: no wait for queued steps
            index = index.pin_memory().to(device, non_blocking=True)
        for key, hot in self.modules.items():
            module = self._pool.modules[key]
            num_slices, out = len(module.slice_offsets) - 1, module.slice_offsets[-1]
            in_features = hot.stacked.shape[1]
            block = hot.stacked[out:].view(num_slices, hot.hot, in_features)
            a = module.a_rows.index_select(0, index[0]).view(-1, num_slices, in_features)
            block.index_copy_(1, index[1], a.transpose(0, 1))
        self.num_fills += len(fills)


def make_hot_cache(
    model: LlamaModel, layout: RowLayout, backend: LoraBackend, num_rows: int | None
) -> HotCache | None:
    """The hot cache for a LoRA runner (call it before the arena is sized: its memory then
    comes out of the arena's budget). `num_rows`: None = the cost rule, 0 = none."""
    if num_rows == 0 or not isinstance(backend, OpsBackend) or not layout.modules:
        return None
    rows = hot_rows_for(model, layout) if num_rows is None else num_rows
    return HotCache(model, layout, backend, num_rows=rows)
