"""The reference attention's gather indices: rows grouped by length so padding stays bounded.

Rows whose query and context lengths fall in the same power-of-two bucket share one padded
batch; a group pads each row to at most twice its length in each dimension, so the work follows
the real token counts (one long prompt does not make a thousand short rows pad to its length).
Builds index tensors only; never reads the cache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DenseGroup(NamedTuple):
    """One padded batch of rows for SDPA."""

    token_index: torch.Tensor  # [n] int64, the step's token index of each of the group's tokens
    token_to_padded: torch.Tensor  # [n] int64, index into [group_rows * max_query_len]
    kv_index: torch.Tensor  # [group_rows, max_kv_len] int64, flat KV index of each position
    mask: torch.Tensor  # [group_rows, 1, max_query_len, max_kv_len] bool, True = attend
    # [group_rows, max_kv_len, 1, 1] bool: position < the row's kv_len. Positions past it gather
    # whatever their page holds (stale K/V, padding page 0) and are zeroed before SDPA.
    kv_valid: torch.Tensor
    max_query_len: int


def _bucket(n: int) -> int:
    return max(1, n - 1).bit_length()  # 1, 2 -> 1; 3, 4 -> 2; 5..8 -> 3; ...


def group_rows(query_lens: list[int], kv_lens: list[int]) -> list[list[int]]:
    """Rows with new tokens, grouped by (query bucket, kv bucket), each group in row order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for row, (q_len, kv_len) in enumerate(zip(query_lens, kv_lens, strict=True)):
        if q_len > 0:
            groups.setdefault((_bucket(q_len), _bucket(kv_len)), []).append(row)
    return [groups[key] for key in sorted(groups)]


def build_dense_groups(
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    *,
    page_size: int,
) -> tuple[DenseGroup, ...]:
    """Gather indices and causal masks per group (reads the lengths on the host: a sync on CUDA,
    which only the reference backend pays).

    Args:
        query_lens, context_lens: [num_rows] int, new and cached tokens per row.
        block_tables: [num_rows, max_pages] int, padded with any page id (masked and zeroed).
        query_start: [num_rows + 1] int, cumulative query_lens.
    """
    q_host = query_lens.tolist()
    kv_host = (query_lens + context_lens).tolist()
    out = []
    for rows in group_rows(q_host, kv_host):
        max_q = max(q_host[r] for r in rows)
        max_kv = max(kv_host[r] for r in rows)
        lengths = (query_lens, context_lens, block_tables, query_start)
        out.append(_group(rows, max_q, max_kv, *lengths, page_size))
    return tuple(out)


def _group(
    rows: list[int],
    max_q: int,
    max_kv: int,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    page_size: int,
) -> DenseGroup:
    device = query_lens.device
    index = torch.tensor(rows, dtype=torch.int64, device=device)  # [g]
    q_lens, c_lens = query_lens.long()[index], context_lens.long()[index]  # [g]
    num_tokens = int(sum(q_lens.tolist()))
    local = torch.repeat_interleave(torch.arange(len(rows), device=device), q_lens,
                                    output_size=num_tokens)  # fmt: skip
    first = torch.cumsum(q_lens, 0) - q_lens  # [g], each row's first token within the group
    j = torch.arange(num_tokens, device=device) - first[local]  # [n], index within its row
    token_index = query_start.long()[index][local] + j
    kv = torch.arange(max_kv, device=device)  # [max_kv]
    tables = block_tables.long()[index]
    kv_index = tables[:, kv // page_size] * page_size + kv % page_size  # [g, max_kv]
    # Padding query slots copy the row's last real query so no mask row is empty (NaN-free).
    jq = torch.arange(max_q, device=device)[None, :]  # [1, max_q]
    last_visible = c_lens[:, None] + torch.minimum(jq, q_lens[:, None] - 1)  # [g, max_q]
    mask = kv[None, None, :] <= last_visible[:, :, None]  # [g, max_q, max_kv]; causal
    kv_valid = kv[None, :] < (c_lens + q_lens)[:, None]  # [g, max_kv]
    return DenseGroup(
        token_index=token_index,
        token_to_padded=local * max_q + j,
        kv_index=kv_index,
        mask=mask[:, None],
        kv_valid=kv_valid[:, :, None, None],
        max_query_len=max_q,
    )
