"""lorasrv_kernels: batched LoRA (SGMV) ops, as Triton kernels and as a plain-torch reference.

Imports torch and triton only, never lorasrv.
"""

from __future__ import annotations

from . import reference
from .batch_info import LoraBatchInfo, prepare_lora_batch_info
from .lora_expand import sgmv_expand
from .lora_ops import triton_lora_forward
from .lora_shrink import sgmv_shrink
from .reference import lora_forward

__all__ = [
    "LoraBatchInfo",
    "lora_forward",
    "prepare_lora_batch_info",
    "reference",
    "sgmv_expand",
    "sgmv_shrink",
    "triton_lora_forward",
]
