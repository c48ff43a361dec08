"""lorasrv_kernels: batched LoRA (SGMV) ops, paged attention, KV store, RMSNorm, rotary, SiLU, as
Triton kernels and as plain-torch references.

Imports torch and triton only, never lorasrv.
"""

from __future__ import annotations

from . import attention_reference, reference
from .activation import silu_mul, silu_mul_lora
from .kv_store import store_kv
from .lora_expand import expand_partials, sgmv_expand, sgmv_expand_stacked
from .lora_ops import triton_lora_forward
from .lora_shrink import sgmv_shrink, shrink_partials
from .norm_rope import add_rms_norm, apply_rotary, rms_norm
from .paged_decode import paged_decode_attention, pick_num_splits
from .paged_prefill import paged_prefill_attention
from .reference import lora_forward
from .slot_batch_info import SlotBatchInfo, prepare_slot_batch_info

__all__ = [
    "SlotBatchInfo",
    "add_rms_norm",
    "apply_rotary",
    "attention_reference",
    "expand_partials",
    "lora_forward",
    "paged_decode_attention",
    "paged_prefill_attention",
    "pick_num_splits",
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
