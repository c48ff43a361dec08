"""The model's reference attention (CPU): equal to the kernels' plain-torch specification on
mixed batches whose unread pages hold NaN, with padding that follows each row's own lengths."""

from __future__ import annotations

import torch
from lorasrv_kernels import attention_reference

from lorasrv.model.attention import ReferenceAttention, prepare_attention_metadata
from lorasrv.model.dense_index import group_rows

PAGE_SIZE = 4


def step(rows: list[tuple[int, int]], num_pages: int) -> tuple[torch.Tensor, ...]:
    """(cached, new) per row -> query_lens, context_lens, tables (shuffled pages, zero-padded)."""
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(num_pages - 1, generator=gen) + 1  # page 0: never a row's page
    pages_per_row = [-(-(c + n) // PAGE_SIZE) for c, n in rows]
    tables = torch.zeros(len(rows), max(pages_per_row), dtype=torch.int32)
    taken = 0
    for row, count in enumerate(pages_per_row):
        tables[row, :count] = order[taken : taken + count]
        taken += count
    query_lens = torch.tensor([n for _, n in rows], dtype=torch.int32)
    context_lens = torch.tensor([c for c, _ in rows], dtype=torch.int32)
    return query_lens, context_lens, tables


def test_reference_attention_matches_spec_on_nan_pages() -> None:
    # decode rows, prefill chunks after a prefix, one long row; page 0 and every unwritten
    # position hold NaN (freed pages of a bad tenant)
    rows = [(7, 1), (0, 3), (30, 1), (5, 9), (0, 1), (0, 37), (2, 2)]
    num_pages, kv_heads, heads, dim = 40, 2, 4, 8
    query_lens, context_lens, tables = step(rows, num_pages)
    kv_lens = query_lens + context_lens
    k_cache = torch.full((num_pages, PAGE_SIZE, kv_heads, dim), float("nan"))
    v_cache = k_cache.clone()
    for row, kv_len in enumerate(kv_lens.tolist()):
        for pos in range(kv_len):
            page = int(tables[row, pos // PAGE_SIZE])
            k_cache[page, pos % PAGE_SIZE] = torch.randn(kv_heads, dim)
            v_cache[page, pos % PAGE_SIZE] = torch.randn(kv_heads, dim)
    query_start = torch.zeros(len(rows) + 1, dtype=torch.int32)
    torch.cumsum(query_lens, 0, out=query_start[1:])
    num_tokens = int(query_lens.sum())
    q = torch.randn(num_tokens, heads, dim)
    metadata = prepare_attention_metadata(
        query_lens, context_lens, tables, query_start, kv_lens,
        num_tokens=num_tokens, max_query_len=int(query_lens.max()),
        max_kv_len=int(kv_lens.max()), page_size=PAGE_SIZE,
    )  # fmt: skip
    assert metadata.dense is not None
    assert len(metadata.dense) > 1  # the long row does not share a padded batch with the rest
    out = ReferenceAttention(scale=dim**-0.5).forward(q, k_cache, v_cache, metadata)
    expected = attention_reference.paged_prefill_attention(
        q, k_cache, v_cache, tables, query_start, kv_lens, dim**-0.5
    )
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_padding_follows_real_token_counts() -> None:
    # The shape, scaled down: 400 short prompts and one long one in a step. Padding every
    # row to the longest made 401 x 1000 x 1000 mask entries (and SDPA scores per head).
    rows = [(0, 1 + i % 8) for i in range(400)] + [(0, 1000)]
    query_lens, context_lens, tables = step(rows, num_pages=2 + 1000 // PAGE_SIZE + 400 * 2)
    kv_lens = query_lens + context_lens
    query_start = torch.zeros(len(rows) + 1, dtype=torch.int32)
    torch.cumsum(query_lens, 0, out=query_start[1:])
    metadata = prepare_attention_metadata(
        query_lens, context_lens, tables, query_start, kv_lens,
        num_tokens=int(query_lens.sum()), max_query_len=1000, max_kv_len=1000,
        page_size=PAGE_SIZE,
    )  # fmt: skip
    assert metadata.dense is not None
    padded = sum(g.mask.numel() for g in metadata.dense)
    real = sum(n * (c + n) for c, n in rows)
    assert padded <= 4 * real
    tokens = torch.cat([g.token_index for g in metadata.dense])
    assert sorted(tokens.tolist()) == list(range(int(query_lens.sum())))  # each token once


def test_group_rows() -> None:
    # (query, kv) buckets: rows without new tokens are left out; each group keeps row order
    assert group_rows([1, 1, 5, 0, 1], [3, 40, 9, 4, 4]) == [[0, 4], [1], [2]]
    assert group_rows([], []) == []
