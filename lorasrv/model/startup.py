"""Startup decisions of the runner: device, dtype, context length, LoRA targets, the arena's size.

Small pure-ish functions of the config and the machine; only `make_arena` allocates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lorasrv.config import SUPPORTED_LORA_MODULES
from lorasrv.model.arch import ModelArch
from lorasrv.model.arena import Arena, KvGeometry

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CPU_KV_CACHE_BYTES = 256 << 20


def resolve_device(device: str) -> torch.device:
    """ "auto" = cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, arch: ModelArch, device: torch.device) -> torch.dtype:
    """ "auto" = the checkpoint's half dtype on CUDA (bfloat16 fallback), float32 on CPU."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type != "cuda":
        return torch.float32  # CPU matmuls in half precision are slow and inexact
    # float32 (or unnamed) checkpoints are served in bfloat16 on the GPU, as SGLang does.
    name = arch.torch_dtype
    return DTYPES[name] if name in ("bfloat16", "float16") else torch.bfloat16


def context_length(arch: ModelArch, override: int | None) -> int:
    limit = arch.max_position_embeddings
    if arch.sliding_window is not None and arch.sliding_window < limit:
        # No sliding-window attention here: cap the context so the window never matters.
        logger.info("capping context length to the sliding window (%d)", arch.sliding_window)
        limit = arch.sliding_window
    return min(override, limit) if override is not None else limit


def lora_target_modules(modules: tuple[str, ...]) -> tuple[str, ...]:
    """Normalize (`all` = every supported module) into SUPPORTED_LORA_MODULES order."""
    if "all" in modules:
        return SUPPORTED_LORA_MODULES
    unknown = [m for m in modules if m not in SUPPORTED_LORA_MODULES]
    if unknown:
        raise ValueError(f"unsupported LoRA target modules {unknown}")
    return tuple(m for m in SUPPORTED_LORA_MODULES if m in modules)


def free_device_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]


def kv_geometry(arch: ModelArch, page_size: int) -> KvGeometry:
    return KvGeometry(arch.num_layers, page_size, arch.num_kv_heads, arch.head_dim)


def count_kv_pages(
    arch: ModelArch,
    *,
    page_size: int,
    dtype: torch.dtype,
    device: torch.device,
    kv_cache_bytes: int | None,
    mem_fraction_static: float,
) -> int:
    """Arena pages that fit the budget: explicit bytes, else a share of free CUDA memory, else
    256 MiB. The arena holds KV pages and LoRA rows alike, so this is its whole size.

    Call it once the weights are resident, so "free" excludes them.
    """
    per_page = kv_geometry(arch, page_size).page_elems * torch.empty((), dtype=dtype).element_size()
    if kv_cache_bytes is not None:
        budget = kv_cache_bytes
    elif device.type == "cuda":
        # What stays free is headroom for activations (the reference attention's padded
        # gathers included) and the allocator.
        budget = int(free_device_bytes(device) * mem_fraction_static)
    else:
        budget = CPU_KV_CACHE_BYTES
    num_pages = budget // per_page
    if num_pages < 1:
        raise ValueError(f"KV cache budget {budget} bytes holds no page of {per_page} bytes")
    return num_pages


def make_arena(
    arch: ModelArch,
    *,
    page_size: int,
    row_elems: int,
    dtype: torch.dtype,
    device: torch.device,
    kv_cache_bytes: int | None,
    num_kv_pages: int | None,
    mem_fraction_static: float,
    min_pages: Callable[[int], int] | None = None,
) -> Arena:
    """The arena sized as the KV cache alone was: `num_kv_pages` if given, else the budget.

    `min_pages` (TP): the smallest count over ranks, so every page and row id is valid on each.
    """
    num_pages = num_kv_pages or count_kv_pages(
        arch,
        page_size=page_size,
        dtype=dtype,
        device=device,
        kv_cache_bytes=kv_cache_bytes,
        mem_fraction_static=mem_fraction_static,
    )
    if min_pages is not None:  # NOTE: the scheduler's page and row ids must fit every rank
        num_pages = min_pages(num_pages)
    geometry = kv_geometry(arch, page_size)
    return Arena(geometry, num_pages=num_pages, row_elems=row_elems, dtype=dtype, device=device)
