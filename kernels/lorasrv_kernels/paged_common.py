"""Argument checks shared by the paged-attention launchers (decode and prefill); no kernels."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PagedShapes(NamedTuple):
    out: torch.Tensor  # the output to write, allocated if the caller gave none
    page_size: int
    num_kv_heads: int


def check_paged_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    index_tensors: tuple[torch.Tensor, ...],
    out: torch.Tensor | None,
) -> PagedShapes:
    """Validate q `[tokens, heads, dim]` against caches `[pages, page_size, kv_heads, dim]`.

    `index_tensors` (kv_lens, query_start, ...) must be int32, like the block tables.
    """
    _, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, cache_dim = k_cache.shape
    assert cache_dim == head_dim, "K/V cache shape mismatch"
    assert v_cache.shape == k_cache.shape, "K/V cache shape mismatch"
    assert num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(2) == 1
    assert k_cache.stride(3) == 1
    assert v_cache.stride(3) == 1
    assert block_tables.dtype == torch.int32
    assert all(t.dtype == torch.int32 for t in index_tensors)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape
    assert out.stride(2) == 1
    return PagedShapes(out, page_size, num_kv_heads)
