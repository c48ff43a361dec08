"""Plain-torch paged attention and KV store: the specification the Triton kernels are tested
against. Loops over rows (clarity over speed); never used by the model, which has its own
vectorized reference backend.
"""

from __future__ import annotations

import torch


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, kv_len: int) -> torch.Tensor:
    """`[kv_len, num_kv_heads, head_dim]`: positions 0..kv_len-1 of one row, through its pages."""
    page_size = cache.shape[1]
    pos = torch.arange(kv_len, device=cache.device)
    pages = block_table.long()[pos // page_size]
    return cache[pages, pos % page_size]


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [n, H, D], k/v [L, KVH, D], visible [n, L] bool -> [n, H, D] float32."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # [L, H, D]: head h reads kv head h // group
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), k) * scale  # [H, n, L]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(dim=-1), v)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference decode attention (see `paged_decode.paged_decode_attention`).

    Args:
        q: [num_rows, num_heads, head_dim]; k_cache/v_cache: [num_pages, page_size, kv_heads, d].
        block_tables: [num_rows, max_pages] int; kv_lens: [num_rows] int >= 1.

    Returns:
        [num_rows, num_heads, head_dim] in q.dtype.
    """
    out = torch.empty_like(q)
    for row, kv_len in enumerate(kv_lens.tolist()):
        k = gather_context(k_cache, block_tables[row], kv_len)
        v = gather_context(v_cache, block_tables[row], kv_len)
        visible = torch.ones(1, kv_len, dtype=torch.bool, device=q.device)
        out[row] = _attend(q[row : row + 1], k, v, visible, scale)[0].to(q.dtype)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference prefill attention (see `paged_prefill.paged_prefill_attention`): token i of a
    row with c cached tokens sees context positions 0..c+i.

    Args:
        q: [num_tokens, num_heads, head_dim]; query_start: [num_rows + 1] int;
        kv_lens: [num_rows] int, cached + new tokens; other args as in the decode op.

    Returns:
        [num_tokens, num_heads, head_dim] in q.dtype.
    """
    out = torch.empty_like(q)
    starts = query_start.tolist()
    for row, kv_len in enumerate(kv_lens.tolist()):
        start, end = starts[row], starts[row + 1]
        if end == start:
            continue
        prefix_len = kv_len - (end - start)
        k = gather_context(k_cache, block_tables[row], kv_len)
        v = gather_context(v_cache, block_tables[row], kv_len)
        last = prefix_len + torch.arange(end - start, device=q.device)  # [n]
        visible = torch.arange(kv_len, device=q.device)[None, :] <= last[:, None]
        out[start:end] = _attend(q[start:end], k, v, visible, scale).to(q.dtype)
    return out


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference KV store: `cache[s // page_size, s % page_size] = new` for every s >= 0."""
    page_size = k_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // page_size, slot % page_size] = k[token]
            v_cache[slot // page_size, slot % page_size] = v[token]
