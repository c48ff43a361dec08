"""Paged KV cache and attention: the cache layout, storing new K/V, and the attention backends.

The reference backend gathers each row's pages into a padded batch for SDPA; Triton kernels plug
in behind `AttentionBackend` later. Never reads the StepPlan: metadata arrives as device tensors.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F


class KvCache:
    """Per layer K and V, each `[num_pages, page_size, num_kv_heads, head_dim]`."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # One allocation: [num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]
        self.buffer = torch.zeros(
            num_layers, 2, num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.num_pages = num_pages
        self.page_size = page_size

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buffer[i, 0], self.buffer[i, 1]

    @staticmethod
    def bytes_per_page(
        *, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * element_size


class AttentionMetadata(NamedTuple):
    """Device tensors describing one step's rows; built once per step, shared by all layers."""

    positions: torch.Tensor  # [num_tokens] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # [num_tokens] int64, flat KV index: page * page_size + offset
    token_to_padded: torch.Tensor  # [num_tokens] int64, index into [num_rows * max_query_len]
    kv_index: torch.Tensor  # [num_rows, max_kv_len] int64, flat KV index of each context token
    mask: torch.Tensor  # [num_rows, 1, max_query_len, max_kv_len] bool, True = attend
    num_rows: int
    max_query_len: int


def prepare_attention_metadata(
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    num_tokens: int,
    max_query_len: int,
    max_kv_len: int,
    page_size: int,
) -> AttentionMetadata:
    """Vectorized per-token and per-row indices from per-row lengths (all on one device).

    Args:
        query_lens, context_lens: [num_rows] int, new tokens and cached tokens per row.
        block_tables: [num_rows, >= ceil(max_kv_len / page_size)] int, padded with any page id.
    """
    device = query_lens.device
    num_rows = query_lens.shape[0]
    query_lens, context_lens = query_lens.long(), context_lens.long()
    tables = block_tables.long()
    rows = torch.arange(num_rows, device=device)
    row_of_token = torch.repeat_interleave(rows, query_lens, output_size=num_tokens)  # [T]
    query_start = torch.cumsum(query_lens, 0) - query_lens  # [num_rows]
    j_of_token = torch.arange(num_tokens, device=device) - query_start[row_of_token]  # [T]
    positions = context_lens[row_of_token] + j_of_token  # [T]
    slot_mapping = tables[row_of_token, positions // page_size] * page_size + positions % page_size
    kv = torch.arange(max_kv_len, device=device)  # [max_kv_len]
    kv_index = tables[:, kv // page_size] * page_size + kv % page_size  # [num_rows, max_kv_len]
    # Padding query slots copy the row's last real query so no mask row is empty (NaN-free).
    jq = torch.arange(max_query_len, device=device)[None, :]  # [1, max_q]
    last_visible = context_lens[:, None] + torch.minimum(jq, query_lens[:, None] - 1)  # [R, max_q]
    mask = kv[None, None, :] <= last_visible[:, :, None]  # [R, max_q, max_kv]; causal
    return AttentionMetadata(
        positions=positions,
        slot_mapping=slot_mapping,
        token_to_padded=row_of_token * max_query_len + j_of_token,
        kv_index=kv_index,
        mask=mask[:, None],
        num_rows=num_rows,
        max_query_len=max_query_len,
    )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the new tokens' K/V `[num_tokens, num_kv_heads, head_dim]` into their pages."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """q `[num_tokens, num_heads, head_dim]` -> output of the same shape.

        The new tokens' K/V are already stored in the cache.
        """
        ...


class ReferenceAttention:
    """Gather every row's context into a padded batch and run SDPA with a causal mask.

    Memory grows with num_rows * max_kv_len; fine for CPU and tests, the GPU gets kernels.
    """

    def __init__(self, *, scale: float) -> None:
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        _, num_heads, head_dim = q.shape
        num_rows, max_q = metadata.num_rows, metadata.max_query_len
        num_kv_heads = k_cache.shape[2]
        q_padded = q.new_zeros(num_rows * max_q, num_heads, head_dim)
        q_padded[metadata.token_to_padded] = q
        q_padded = q_padded.view(num_rows, max_q, num_heads, head_dim).transpose(1, 2)
        k = k_cache.view(-1, num_kv_heads, head_dim)[metadata.kv_index]  # [R, max_kv, kv_h, d]
        v = v_cache.view(-1, num_kv_heads, head_dim)[metadata.kv_index]
        out = F.scaled_dot_product_attention(
            q_padded,  # [R, num_heads, max_q, head_dim]
            k.transpose(1, 2),  # [R, num_kv_heads, max_kv, head_dim]
            v.transpose(1, 2),
            attn_mask=metadata.mask,
            scale=self.scale,
            enable_gqa=num_kv_heads != num_heads,
        )  # [R, num_heads, max_q, head_dim]
        out = out.transpose(1, 2).reshape(num_rows * max_q, num_heads, head_dim)
        return out[metadata.token_to_padded]  # [num_tokens, num_heads, head_dim]
