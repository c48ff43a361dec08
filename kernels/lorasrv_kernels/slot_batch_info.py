"""SlotBatchInfo: the per-step segment table of the slot-based LoRA ops (stacked per-slot A/B).

Host-side building only (no kernels). Superseded by `batch_info.LoraBatchInfo` (arena rows);
goes away with the slot-based ops once the model stops using them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class SlotBatchInfo(NamedTuple):
    """Rows are sorted so that each segment is a run of tokens sharing one adapter."""

    seg_indptr: torch.Tensor  # [num_segments + 1] int32, token offsets
    seg_slot: torch.Tensor  # [num_segments] int32, slot into the stacks; -1 = base model, no LoRA
    slot_rank: torch.Tensor  # [num_slots] int32, 0 = empty slot
    slot_scaling: torch.Tensor  # [num_slots] float32, lora_alpha / r (alpha / sqrt(r) for rsLoRA)
    max_seg_len: int  # host int, the longest segment (sizes the kernel grids)


def prepare_slot_batch_info(
    seg_lens: Sequence[int],
    seg_slots: Sequence[int],
    slot_rank: Sequence[int],
    slot_scaling: Sequence[float],
    device: torch.device | str = "cpu",
) -> SlotBatchInfo:
    """Build a SlotBatchInfo from host lists (one H2D copy per tensor)."""
    assert len(seg_lens) == len(seg_slots), "one slot per segment"
    assert len(slot_rank) == len(slot_scaling), "one rank and one scaling per slot"
    indptr = [0]
    for seg_len in seg_lens:
        assert seg_len >= 0, "segment lengths are non-negative"
        indptr.append(indptr[-1] + seg_len)
    return SlotBatchInfo(
        seg_indptr=torch.tensor(indptr, dtype=torch.int32, device=device),
        seg_slot=torch.tensor(list(seg_slots), dtype=torch.int32, device=device),
        slot_rank=torch.tensor(list(slot_rank), dtype=torch.int32, device=device),
        slot_scaling=torch.tensor(list(slot_scaling), dtype=torch.float32, device=device),
        max_seg_len=max(seg_lens, default=0),
    )
