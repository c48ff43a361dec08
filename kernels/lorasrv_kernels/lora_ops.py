"""Triton LoRA forward: shrink then expand, the one call the model's LoRA-aware linears make.

Composes the launchers only; no kernel of its own.
"""

from __future__ import annotations

import torch

from .lora_expand import expand_partials
from .lora_shrink import shrink_partials
from .slot_batch_info import SlotBatchInfo


def triton_lora_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    info: SlotBatchInfo,
    slice_offsets: tuple[int, ...],
) -> None:
    """Add the batched LoRA delta to y in place (two launches, no host sync: capturable).

    Semantics: `y[s[i]:s[i+1], off[j]:off[j+1]] += scale[slot[i]] *
    (x[s[i]:s[i+1]] @ A[slot[i], j*R:(j+1)*R].T) @ B[slot[i], off[j]:off[j+1]].T`,
    with the intermediate rounded to x.dtype, as in `reference.lora_forward`.

    Args:
        x: [num_tokens, in_features], float32/float16/bfloat16.
        y: [num_tokens, out_total], updated in place (may be a strided view).
        a_stack: [num_slots, num_slices * max_rank, in_features], x.dtype.
        b_stack: [num_slots, out_total, max_rank], x.dtype.
        info: segment table on x.device.
        slice_offsets: num_slices + 1 host ints (num_slices <= 3), last one == out_total.
    """
    # [split_k, num_tokens, slices * rank]; the expand sums the split-K partials itself.
    parts = shrink_partials(x, a_stack, info, len(slice_offsets) - 1, zero_fill=False)
    expand_partials(parts, b_stack, y, info, slice_offsets)
