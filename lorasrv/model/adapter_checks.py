"""Refusals of adapter files by content: tensor dtypes, non-finite or absurd values, added tokens.

One adapter's NaN, Inf or huge weights must never load: their K/V would poison the pages its
rows write. Values are checked once, on the packed copy the pool will hold: one `aminmax` pass
over the adapter (no copies; ~0.3 s per GB on one core). CPU only; never the GPU.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping

import torch

from lorasrv.model.lora_layout import AdapterWeights
from lorasrv.peft_config import AdapterLoadError

# NOTE: trained LoRA weights stay far below 1 (A near 1/sqrt(in), B near 0); 1e4 is absurd for
# any of them, and stays under float16's 65504, so a weight accepted here is finite in every
# serving dtype. B is checked with the alpha/rank pattern ratio folded in.
MAX_ABS_WEIGHT = 1e4
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_dtypes(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """Floating-point tensors only (an int8 tensor would be read as if it were weights)."""
    for key, tensor in tensors.items():
        if tensor.dtype not in _FLOAT_DTYPES:
            raise AdapterLoadError(
                f"adapter {path!r}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')}; "
                "only float16, bfloat16 and float32 weights are supported (no quantized adapters)"
            )


def check_packed(weights: AdapterWeights, path: str) -> None:
    """Finite values within +-MAX_ABS_WEIGHT in what the pool will hold (serving dtype, pattern
    ratios folded into B), so an overflow in the conversion is caught too."""
    for (layer, module), packed in weights.modules.items():
        _check_values(packed.a, f"layer {layer} {module} lora_A", path)
        _check_values(packed.b, f"layer {layer} {module} lora_B (pattern scaling applied)", path)


def _check_values(tensor: torch.Tensor, what: str, path: str) -> None:
    if tensor.numel() == 0:
        return
    low, high = (float(x) for x in torch.aminmax(tensor.detach()))  # NaN propagates to both
    if not (math.isfinite(low) and math.isfinite(high)):
        raise AdapterLoadError(f"adapter {path!r}: {what} holds NaN or infinite values")
    largest = max(-low, high)
    if largest > MAX_ABS_WEIGHT:
        raise AdapterLoadError(
            f"adapter {path!r}: {what} holds values up to {largest:.3g} in magnitude; LoRA "
            f"weights beyond {MAX_ABS_WEIGHT:g} are refused as corrupt"
        )


def check_added_tokens(path: str, vocab_size: int) -> None:
    """An `added_tokens.json` may only name tokens the base vocabulary already has."""
    added_file = os.path.join(path, "added_tokens.json")
    if not os.path.isfile(added_file):
        return
    try:
        with open(added_file, "rb") as f:
            added = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"adapter {path!r}: invalid added_tokens.json: {exc}") from None
    if not isinstance(added, dict) or not _all_ids(added.values()):
        raise AdapterLoadError(
            f"adapter {path!r}: added_tokens.json must be an object of token -> integer id"
        )
    new = sorted(t for t, i in added.items() if not 0 <= i < vocab_size)
    if new:
        raise AdapterLoadError(
            f"adapter {path!r}: adds tokens beyond the base vocabulary ({vocab_size}): "
            f"{[t[:40] for t in new[:5]]}; added tokens are not supported"
        )


def _all_ids(values: Iterable[object]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)
