"""Triton LoRA delta over arena rows: shrink then expand, the call a LoRA-aware linear makes.

Composes the launchers only; no kernel of its own.
"""

from __future__ import annotations

import torch

from .batch_info import LoraBatchInfo
from .row_expand import lora_expand
from .row_shrink import lora_shrink


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    a_rows: torch.Tensor,
    bt_rows: torch.Tensor,
    info: LoraBatchInfo,
    slice_offsets: tuple[int, ...],
) -> None:
    """Add the batched LoRA delta to y in place (two launches, no host sync: capturable).

    Semantics: `y[t, off_j:off_{j+1}] += scaling[s] * (x[t] @ A_s[j].T) @ B_s[j].T` for token t
    of segment s, where A_s[j] / B_s[j] are slice j of the adapter held in arena rows
    `row_index[row_start[s]:row_start[s] + rank[s]]`; the rank-r intermediate in float32, as
    in `lora_reference.lora_apply`.

    Args:
        x: [num_tokens, in_features], float32/float16/bfloat16.
        y: [num_tokens, out_total], updated in place (may be a strided view).
        a_rows: [max_rows, num_slices * in_features], x.dtype; any row stride.
        bt_rows: [max_rows, out_total], x.dtype; any row stride.
        info: the step's segments on x.device.
        slice_offsets: num_slices + 1 host ints (num_slices <= 3), the last == out_total.
    """
    v = lora_shrink(x, a_rows, info, len(slice_offsets) - 1)  # [num_tokens, slices * R] f32
    lora_expand(v, bt_rows, y, info, slice_offsets)
