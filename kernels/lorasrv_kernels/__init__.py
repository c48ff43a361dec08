"""lorasrv_kernels: batched LoRA (SGMV) ops, paged attention, KV store, RMSNorm, rotary, SiLU, as
Triton kernels and as plain-torch references.

LoRA over arena rows (`LoraBatchInfo`; `lora_shrink`, `lora_expand`, `lora_apply`,
`lora_silu_mul`, references in `lora_reference`; `lora_expand_cols`/`lora_silu_mul_cols` read
a stacked `[W; A_hot]` GEMM's shrink columns) supersedes the slot-based ops (`SlotBatchInfo`,
`sgmv_*`, `triton_lora_forward`, `silu_mul_lora`, `reference.lora_forward`), which stay until the
model stops using them. Imports torch and triton only, never lorasrv.
"""

from __future__ import annotations

from . import attention_reference, lora_reference, reference
from .activation import silu_mul, silu_mul_lora
from .batch_info import (
    LoraBatchBuffers,
    LoraBatchInfo,
    LoraBatchLayout,
    prepare_lora_batch_info,
)
from .kv_store import store_kv
from .lora_expand import expand_partials, sgmv_expand, sgmv_expand_stacked
from .lora_ops import triton_lora_forward
from .lora_shrink import sgmv_shrink, shrink_partials
from .norm_rope import add_rms_norm, apply_rotary, rms_norm
from .paged_decode import paged_decode_attention, pick_num_splits
from .paged_prefill import paged_prefill_attention
from .reference import lora_forward
from .row_activation import ActConfig, lora_silu_mul, lora_silu_mul_cols
from .row_expand import ExpandConfig, lora_expand, lora_expand_cols
from .row_ops import lora_apply
from .row_shrink import ShrinkConfig, lora_shrink
from .slot_batch_info import SlotBatchInfo, prepare_slot_batch_info

__all__ = [
    "ActConfig",
    "ExpandConfig",
    "LoraBatchBuffers",
    "LoraBatchInfo",
    "LoraBatchLayout",
    "ShrinkConfig",
    "SlotBatchInfo",
    "add_rms_norm",
    "apply_rotary",
    "attention_reference",
    "expand_partials",
    "lora_apply",
    "lora_expand",
    "lora_expand_cols",
    "lora_forward",
    "lora_reference",
    "lora_shrink",
    "lora_silu_mul",
    "lora_silu_mul_cols",
    "paged_decode_attention",
    "paged_prefill_attention",
    "pick_num_splits",
    "prepare_lora_batch_info",
    "prepare_slot_batch_info",
    "reference",
    "rms_norm",
    "sgmv_expand",
    "sgmv_expand_stacked",
    "sgmv_shrink",
    "shrink_partials",
    "silu_mul",
    "silu_mul_lora",
    "store_kv",
    "triton_lora_forward",
]
