"""Paged KV cache and attention: the cache layout, storing new K/V, and the attention backends.

The reference backend gathers rows of similar length into padded batches for SDPA (CPU, tests);
the Triton backend reads pages in place (CUDA). Never reads the StepPlan: metadata arrives as
tensors.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import lorasrv_kernels
import torch
import torch.nn.functional as F

from lorasrv.model.arena import Arena
from lorasrv.model.dense_index import DenseGroup, build_dense_groups


class KvCache:
    """Per layer K and V: views of the arena's pages, each `[num_pages, page_size, num_kv_heads,
    head_dim]` with a page stride of one whole page across layers (see arena.py)."""

    def __init__(self, arena: Arena) -> None:
        self.pages = arena.kv  # [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]
        self.num_pages = arena.num_pages
        self.page_size = arena.page_size

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pages[:, i, 0], self.pages[:, i, 1]


class AttentionMetadata(NamedTuple):
    """Device tensors describing one step's rows; built once per step, shared by all layers."""

    positions: torch.Tensor  # [num_tokens] int32/int64, position of each new token in its seq
    slot_mapping: torch.Tensor  # [num_tokens] int32/int64, page * page_size + offset; -1 = skip
    block_tables: torch.Tensor  # [num_rows, max_pages] int32, pages per row (padding unread)
    query_start: torch.Tensor  # [num_rows + 1] int32, token offset of each row's new tokens
    kv_lens: torch.Tensor  # [num_rows] int32, cached + new tokens per row
    num_rows: int
    max_query_len: int
    max_kv_len: int  # host upper bound of kv_lens
    dense: tuple[DenseGroup, ...] | None  # reference backend only (None for the kernels)


def prepare_attention_metadata(
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    kv_lens: torch.Tensor,
    *,
    num_tokens: int,
    max_query_len: int,
    max_kv_len: int,
    page_size: int,
    dense: bool = True,
) -> AttentionMetadata:
    """Vectorized per-token and per-row indices from per-row lengths (all on one device).

    Args:
        query_lens, context_lens, kv_lens: [num_rows] int32, new, cached and total tokens per row.
        block_tables: [num_rows, >= ceil(max_kv_len / page_size)] int32, padded with any page id.
        query_start: [num_rows + 1] int32, cumulative query_lens.
        dense: also build the reference backend's gather indices and mask.
    """
    device = query_lens.device
    num_rows = query_lens.shape[0]
    q_lens, c_lens = query_lens.long(), context_lens.long()
    tables = block_tables.long()
    rows = torch.arange(num_rows, device=device)
    row_of_token = torch.repeat_interleave(rows, q_lens, output_size=num_tokens)  # [T]
    j_of_token = torch.arange(num_tokens, device=device) - query_start.long()[row_of_token]  # [T]
    positions = c_lens[row_of_token] + j_of_token  # [T]
    slot_mapping = tables[row_of_token, positions // page_size] * page_size + positions % page_size
    groups = None
    if dense:
        groups = build_dense_groups(
            query_lens, context_lens, block_tables, query_start, page_size=page_size
        )
    return AttentionMetadata(
        positions=positions,
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        query_start=query_start,
        kv_lens=kv_lens,
        num_rows=num_rows,
        max_query_len=max_query_len,
        max_kv_len=max_kv_len,
        dense=groups,
    )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the new tokens' K/V `[num_tokens, num_kv_heads, head_dim]` into their pages.

    Slots < 0 (padding rows of a decode bucket) write nothing. CUDA: one Triton launch, no sync;
    elsewhere index_copy_ of the real rows.
    """
    if k.is_cuda:
        lorasrv_kernels.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):  # a host check: this path never runs on a GPU
        slots, k, v = slots[keep], k[keep], v[keep]
    page_size = k_cache.shape[1]
    pages, offsets = slots // page_size, slots % page_size
    # Advanced-index assignment writes through the strided page view into the arena.
    k_cache[pages, offsets] = k.to(k_cache.dtype)
    v_cache[pages, offsets] = v.to(v_cache.dtype)


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
    """Gather each group of similar-length rows into a padded batch and run SDPA with a causal
    mask (`dense_index.py`); padding stays within 2x of each row's lengths.

    For CPU and tests; the GPU gets kernels.
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
        assert metadata.dense is not None, (
            "ReferenceAttention needs dense metadata (StepPreparer dense=True)"
        )
        out = torch.empty_like(q)
        for group in metadata.dense:
            out[group.token_index] = self._group(q, k_cache, v_cache, group)
        return out

    def _group(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DenseGroup
    ) -> torch.Tensor:
        """The group's tokens' outputs, `[n, num_heads, head_dim]` in group token order."""
        _, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        num_rows, max_q = group.kv_index.shape[0], group.max_query_len
        q_padded = q.new_zeros(num_rows * max_q, num_heads, head_dim)
        q_padded[group.token_to_padded] = q[group.token_index]
        q_padded = q_padded.view(num_rows, max_q, num_heads, head_dim).transpose(1, 2)
        # NOTE: the mask alone is not enough: SDPA multiplies masked positions' V by a zero
        # weight, and 0 x NaN = NaN, so stale NaN past a row's length must never reach it.
        page_size = k_cache.shape[1]
        pages, offsets = group.kv_index // page_size, group.kv_index % page_size
        k = k_cache[pages, offsets]  # [g, max_kv, kv_h, d]; pages are strided arena views
        k = k.masked_fill(~group.kv_valid, 0.0)
        v = v_cache[pages, offsets]
        v = v.masked_fill(~group.kv_valid, 0.0)
        out = F.scaled_dot_product_attention(
            q_padded,  # [g, num_heads, max_q, head_dim]
            k.transpose(1, 2),  # [g, num_kv_heads, max_kv, head_dim]
            v.transpose(1, 2),
            attn_mask=group.mask,
            scale=self.scale,
            enable_gqa=num_kv_heads != num_heads,
        )  # [g, num_heads, max_q, head_dim]
        out = out.transpose(1, 2).reshape(num_rows * max_q, num_heads, head_dim)
        return out[group.token_to_padded]


class TritonAttention:
    """Paged attention kernels on the pages in place: the decode kernel when every row has one
    new token, the prefill kernel otherwise (mixed steps included). Syncs nothing: capturable."""

    def __init__(self, *, scale: float) -> None:
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        if metadata.max_query_len == 1:
            # NOTE: splits depend on host values fixed per CUDA-graph bucket only, so a replay
            # and an eager run of the same bucket compute identically.
            num_splits = lorasrv_kernels.pick_num_splits(
                metadata.num_rows, k_cache.shape[2], metadata.max_kv_len
            )
            return lorasrv_kernels.paged_decode_attention(
                q, k_cache, v_cache, metadata.block_tables, metadata.kv_lens, self.scale,
                num_splits=num_splits,
            )  # fmt: skip
        return lorasrv_kernels.paged_prefill_attention(
            q, k_cache, v_cache, metadata.block_tables, metadata.query_start, metadata.kv_lens,
            metadata.max_query_len, self.scale,
        )  # fmt: skip


def make_attention(backend: str, *, scale: float, device: torch.device) -> AttentionBackend:
    """ "auto" = Triton kernels on CUDA, the reference elsewhere; "triton" | "reference" force."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    if backend == "triton":
        return TritonAttention(scale=scale)
    if backend == "reference":
        return ReferenceAttention(scale=scale)
    raise ValueError(f"attention backend {backend!r} not supported; use auto, triton or reference")


def needs_dense_metadata(attention: AttentionBackend) -> bool:
    """Whether the step preparer must build `DenseIndex` (every backend but the kernels)."""
    return not isinstance(attention, TritonAttention)
