"""Inputs of bench/lora_layer.py: one decoder layer's LoRA at Llama-3-8B shapes, held as arena rows
(the row kernels) and as slot stacks (the slot-based two-op and stacked paths), for several layers
so that every graph replay reads cold weights. Builds tensors only; times nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from lorasrv_kernels import (
    LoraBatchBuffers,
    LoraBatchInfo,
    SlotBatchInfo,
    prepare_lora_batch_info,
    prepare_slot_batch_info,
)

# name: (in_features, slice widths), Llama-3-8B; the order is each arena row's layout per layer
MODULES: dict[str, tuple[int, tuple[int, ...]]] = {
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}
TINY_MODULES: dict[str, tuple[int, tuple[int, ...]]] = {  # --smoke on CPU
    "qkv": (64, (64, 16, 16)),
    "o": (64, (64,)),
    "gate_up": (64, (96, 96)),
    "down": (96, (64,)),
}


class Case(NamedTuple):
    num_tokens: int
    num_used: int  # adapters with tokens in the step
    num_resident: int  # adapters in GPU memory (slots for the slot paths)
    ranks: tuple[int, ...]  # adapter a has rank ranks[a % len(ranks)]

    def rank(self, adapter: int) -> int:
        return self.ranks[adapter % len(self.ranks)]

    def seg_lens(self) -> list[int]:
        lens = [self.num_tokens // self.num_used] * self.num_used
        lens[0] += self.num_tokens - sum(lens)
        return lens


CASES: dict[str, Case] = {
    "t64_n64_mixed": Case(64, 64, 64, (8, 16, 32, 64)),
    "t256_n64_mixed": Case(256, 64, 64, (8, 16, 32, 64)),
    "t64_n8_r16": Case(64, 8, 8, (16,)),
    "t64_n8of64_mixed": Case(64, 8, 64, (8, 16, 32, 64)),
}


def offsets(widths: tuple[int, ...]) -> tuple[int, ...]:
    out = [0]
    for width in widths:
        out.append(out[-1] + width)
    return tuple(out)


class Layer(NamedTuple):
    stacked: dict[str, torch.Tensor]  # [out_total + slots * S * R, in]: W, then each slot's A
    b_stack: dict[str, torch.Tensor]  # [slots, out_total, R]
    a_rows: dict[str, torch.Tensor]  # [max_rows, S * in], views of the arena
    bt_rows: dict[str, torch.Tensor]  # [max_rows, out_total], views of the arena


class Setup(NamedTuple):
    modules: dict[str, tuple[int, tuple[int, ...]]]
    layers: list[Layer]
    x: dict[str, torch.Tensor]  # [num_tokens, in] per module
    seg_rows: list[list[int]]
    scaling: list[float]
    rows_exact: LoraBatchInfo  # sized for this step
    rows_bucket: LoraBatchInfo  # static buffers sized for the bucket, as a decode graph has
    slot_exact: SlotBatchInfo
    slot_padded: SlotBatchInfo  # today's decode graph: segments and lengths padded to the bucket
    adapter_bytes: int  # one layer's A and B bytes of the adapters the step uses
    # static buffers with each segment's hot columns (the used adapters side by side in HOT_ROWS
    # hot rows, as the runner's hot A cache); None when they do not fit
    hot_bucket: LoraBatchInfo | None


HOT_ROWS = 128  # the runner's cost rule at Llama-3-8B shapes (lorasrv/model/hot_cache.py)


def weight(layer: Layer, module: str, modules: dict[str, tuple[int, tuple[int, ...]]]
           ) -> torch.Tensor:  # fmt: skip
    return layer.stacked[module][: sum(modules[module][1])]


Modules = dict[str, tuple[int, tuple[int, ...]]]


def _arena(case: Case, modules: Modules, num_layers: int, device: str,
           gen: torch.Generator) -> tuple[torch.Tensor, list[list[int]], dict]:  # fmt: skip
    """Rows of every resident adapter, shuffled (never contiguous); spare rows NaN."""
    layer_elems = sum(len(w) * i + sum(w) for i, w in modules.values())
    ranks = [case.rank(a) for a in range(case.num_resident)]
    max_rows = sum(ranks) + 64
    arena = torch.empty(max_rows, num_layers * layer_elems, dtype=torch.bfloat16, device=device)
    arena.normal_(generator=gen).mul_(0.02)
    host_gen = torch.Generator().manual_seed(int(gen.initial_seed()))
    perm = torch.randperm(max_rows, generator=host_gen).tolist()
    rows, used = [], 0
    for rank in ranks:
        rows.append(perm[used : used + rank])
        used += rank
    arena[perm[used:]] = float("nan")  # rows no adapter holds: never read
    parts: dict[tuple[int, str], tuple[int, int, int]] = {}
    offset = 0
    for layer in range(num_layers):
        for name, (in_features, widths) in modules.items():
            parts[layer, name] = (offset, len(widths) * in_features, sum(widths))
            offset += len(widths) * in_features + sum(widths)
    return arena, rows, parts


def build(case: Case, *, num_layers: int, device: str, tiny: bool = False, seed: int = 0) -> Setup:
    modules = TINY_MODULES if tiny else MODULES
    gen = torch.Generator(device=device).manual_seed(seed)
    arena, rows, parts = _arena(case, modules, num_layers, device, gen)
    max_rank, slots = max(case.ranks), case.num_resident
    layers = []
    for layer in range(num_layers):
        stacked, b_stack, a_rows, bt_rows = {}, {}, {}, {}
        for name, (in_features, widths) in modules.items():
            num_slices, out_total = len(widths), sum(widths)
            s = torch.empty(out_total + slots * num_slices * max_rank, in_features,
                            dtype=torch.bfloat16, device=device)  # fmt: skip
            s.normal_(generator=gen).mul_(0.02)
            b = torch.empty(slots, out_total, max_rank, dtype=torch.bfloat16, device=device)
            b.normal_(generator=gen).mul_(0.02)
            a_view = s[out_total:].view(slots, num_slices, max_rank, in_features)
            for slot in range(slots):  # the slot pool's invariant: zeros past each rank
                a_view[slot, :, case.rank(slot) :] = 0
                b[slot, :, case.rank(slot) :] = 0
            stacked[name], b_stack[name] = s, b
            offset, a_width, b_width = parts[layer, name]
            a_rows[name] = arena[:, offset : offset + a_width]
            bt_rows[name] = arena[:, offset + a_width : offset + a_width + b_width]
        layers.append(Layer(stacked, b_stack, a_rows, bt_rows))
    x = {name: torch.randn(case.num_tokens, in_features, generator=gen, device=device,
                           dtype=torch.bfloat16)
         for name, (in_features, _) in modules.items()}  # fmt: skip
    return Setup(modules, layers, x, *_metadata(case, rows, modules, device))


def _metadata(case: Case, rows: list[list[int]], modules: dict[str, tuple[int, tuple[int, ...]]],
              device: str) -> tuple:  # fmt: skip
    lens, used = case.seg_lens(), range(case.num_used)
    seg_rows = [rows[a] for a in used]
    scaling = [2.0 / case.rank(a) for a in used]
    max_rank, num_tokens = max(case.ranks), case.num_tokens
    rows_exact = prepare_lora_batch_info(lens, seg_rows, scaling, max_rank=max_rank, device=device)
    buffers = LoraBatchBuffers(max_tokens=num_tokens, max_segments=num_tokens,
                               max_row_entries=min(num_tokens, case.num_resident) * max_rank,
                               max_rank=max_rank, device=torch.device(device))  # fmt: skip
    buffers.fill(lens, seg_rows, scaling)
    hot_bucket = None
    if sum(len(rows) for rows in seg_rows) <= HOT_ROWS:
        hot_buffers = LoraBatchBuffers(max_tokens=num_tokens, max_segments=num_tokens,
                                       max_row_entries=HOT_ROWS, max_rank=max_rank,
                                       device=torch.device(device))  # fmt: skip
        cols = [sum(len(r) for r in seg_rows[:s]) for s in range(len(seg_rows))]
        hot_buffers.fill(lens, seg_rows, scaling, cols)
        hot_bucket = hot_buffers.info(num_tokens)
    slot_rank = [case.rank(a) for a in range(case.num_resident)]
    slot_scaling = [2.0 / r for r in slot_rank]
    slot_exact = prepare_slot_batch_info(lens, list(used), slot_rank, slot_scaling, device)
    # today's decode graph (cuda_graphs.py): min(bucket, slots + 1) segments, max_seg_len bucket
    num_padded = min(num_tokens, case.num_resident + 1)
    pad = num_padded - case.num_used
    slot_padded = prepare_slot_batch_info(lens + [0] * pad, list(used) + [-1] * pad, slot_rank,
                                          slot_scaling, device)  # fmt: skip
    slot_padded = slot_padded._replace(max_seg_len=num_tokens)
    total_rank = sum(case.rank(a) for a in used)
    adapter_bytes = sum(total_rank * (len(w) * i + sum(w)) * 2 for i, w in modules.values())
    return (seg_rows, scaling, rows_exact, buffers.info(num_tokens), slot_exact, slot_padded,
            adapter_bytes, hot_bucket)  # fmt: skip


def byte_floor(case: Case, setup: Setup) -> int:
    """Bytes a layer's LoRA must move: the used adapters' rows once, each module's x once and
    its output read and written once (the issue's definition)."""
    io = sum(case.num_tokens * (i + 2 * sum(w)) * 2 for i, w in setup.modules.values())
    return setup.adapter_bytes + io
