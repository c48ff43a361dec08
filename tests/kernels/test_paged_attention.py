"""Paged attention and KV-store kernels against `lorasrv_kernels.attention_reference`.

The reference itself is checked against a dense per-row definition (SDPA on gathered K/V).
CPU runs need TRITON_INTERPRET=1 before Python starts (float32 only); `-m gpu` adds
float16/bfloat16 at Llama-3-8B shapes. Caches start as NaN, so any read of a position that
was never written (past a row's length, or a padding page) poisons the output.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from lorasrv_kernels import (
    attention_reference,
    paged_decode_attention,
    paged_prefill_attention,
    pick_num_splits,
    store_kv,
)

from tests.kernels.marks import IS_INTERPRET, TRITON_DEVICE, needs_cuda, needs_triton

# (atol, rtol). Interpreted float32 is exact up to summation order; compiled float32 dots are tf32.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 2e-5) if IS_INTERPRET else (5e-3, 5e-3),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
GQA = [(2, 2), (4, 2), (8, 2)]  # (num_heads, num_kv_heads): ratios 1, 2, 4
# Odd lengths, exactly one page, one past a page boundary, one token, several pages.
DECODE_KV_LENS = [1, 5, 16, 17, 33, 70]
# (cached prefix, new tokens): empty prefixes, one-token rows, a page-aligned prefix, a long row
# spanning several query blocks, and a row with no new tokens.
PREFILL_ROWS = [(0, 1), (0, 17), (5, 1), (16, 16), (13, 40), (3, 0), (0, 70)]


class PagedCase(NamedTuple):
    k_cache: torch.Tensor  # [num_pages, page_size, num_kv_heads, head_dim], NaN where unwritten
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_rows, max_pages] int32, padded with the poison page
    kv_lens: torch.Tensor  # [num_rows] int32


def make_paged(
    kv_lens: list[int],
    *,
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
) -> PagedCase:
    """Random K/V for each row's positions on shuffled pages; every other slot stays NaN."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_row = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages_per_row) + 2  # + an unused page and the poison padding page
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    order = torch.randperm(num_pages - 1, generator=gen).tolist()
    poison = num_pages - 1
    max_pages = max(pages_per_row, default=0) + 1  # one padding column everywhere
    tables = torch.full((len(kv_lens), max_pages), poison, dtype=torch.int32)
    for row, n in enumerate(kv_lens):
        pages = [order.pop() for _ in range(pages_per_row[row])]
        tables[row, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for pos in range(n):
            page, offset = pages[pos // page_size], pos % page_size
            k_cache[page, offset] = torch.randn(num_kv_heads, head_dim, generator=gen)
            v_cache[page, offset] = torch.randn(num_kv_heads, head_dim, generator=gen)
    return PagedCase(
        k_cache.to(dtype=dtype, device=device),
        v_cache.to(dtype=dtype, device=device),
        tables.to(device),
        torch.tensor(kv_lens, dtype=torch.int32, device=device),
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[actual.dtype]
    assert bool(torch.isfinite(actual).all()), (
        "an output element is NaN/inf (unwritten or bad read)"
    )
    torch.testing.assert_close(actual.cpu(), expected.cpu().to(actual.dtype), atol=atol, rtol=rtol)


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int
) -> torch.Tensor:
    """SDPA over one row's gathered context: q [n, H, D], k/v [L, KVH, D] -> [n, H, D] float32."""
    n, num_heads, _ = q.shape
    kv_len = k.shape[0]
    mask = torch.arange(kv_len)[None, :] <= (prefix_len + torch.arange(n))[:, None]
    out = F.scaled_dot_product_attention(
        q.double().transpose(0, 1),
        k.double().transpose(0, 1),
        v.double().transpose(0, 1),
        attn_mask=mask,
        enable_gqa=num_heads != k.shape[1],
    )
    return out.transpose(0, 1).float()


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), GQA)
def test_reference_matches_dense(num_heads: int, num_kv_heads: int) -> None:
    lens = [c + n for c, n in PREFILL_ROWS]
    case = make_paged(lens, page_size=5, num_kv_heads=num_kv_heads, head_dim=24,
                      dtype=torch.float32, device="cpu")  # fmt: skip
    q_lens = [n for _, n in PREFILL_ROWS]
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_heads, 24)
    out = attention_reference.paged_prefill_attention(
        q, case.k_cache, case.v_cache, case.block_tables, query_start, case.kv_lens, 24**-0.5
    )
    for row, (prefix_len, n) in enumerate(PREFILL_ROWS):
        if n == 0:
            continue
        ctx = attention_reference.gather_context(case.k_cache, case.block_tables[row], lens[row])
        vctx = attention_reference.gather_context(case.v_cache, case.block_tables[row], lens[row])
        start = int(query_start[row])
        expected = dense_attention(q[start : start + n], ctx, vctx, prefix_len)
        torch.testing.assert_close(out[start : start + n], expected, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("page_size", [16, 5])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), GQA)
def test_triton_decode(
    num_heads: int, num_kv_heads: int, page_size: int, num_splits: int | None
) -> None:
    head_dim = 40  # not a power of two: masked columns
    case = make_paged(DECODE_KV_LENS, page_size=page_size, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, dtype=torch.float32, device=TRITON_DEVICE)  # fmt: skip
    q = torch.randn(len(DECODE_KV_LENS), num_heads, head_dim, device=TRITON_DEVICE)
    scale = head_dim**-0.5
    expected = attention_reference.paged_decode_attention(
        q, case.k_cache, case.v_cache, case.block_tables, case.kv_lens, scale
    )
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables, case.kv_lens,
                           scale, num_splits=num_splits, out=out)  # fmt: skip
    assert_close(out, expected)


@needs_triton
def test_triton_decode_strided_q_one_row() -> None:
    # q as a column window of a fused qkv output; a single one-token row with many splits.
    case = make_paged([1], page_size=16, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                      device=TRITON_DEVICE)  # fmt: skip
    qkv = torch.randn(1, (4 + 2 + 2) * 16, device=TRITON_DEVICE)
    q = qkv[:, : 4 * 16].view(1, 4, 16)
    expected = attention_reference.paged_decode_attention(
        q, case.k_cache, case.v_cache, case.block_tables, case.kv_lens, 0.25
    )
    out = paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables, case.kv_lens,
                                 0.25, num_splits=16)  # fmt: skip
    assert_close(out, expected)


@needs_triton
@pytest.mark.parametrize("page_size", [16, 5])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), GQA)
def test_triton_prefill(num_heads: int, num_kv_heads: int, page_size: int) -> None:
    head_dim = 40
    lens = [c + n for c, n in PREFILL_ROWS]
    case = make_paged(lens, page_size=page_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      dtype=torch.float32, device=TRITON_DEVICE)  # fmt: skip
    q_lens = [n for _, n in PREFILL_ROWS]
    starts = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    query_start = torch.tensor(starts, dtype=torch.int32, device=TRITON_DEVICE)
    q = torch.randn(sum(q_lens), num_heads, head_dim, device=TRITON_DEVICE)
    scale = head_dim**-0.5
    expected = attention_reference.paged_prefill_attention(
        q, case.k_cache, case.v_cache, case.block_tables, query_start, case.kv_lens, scale
    )
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, case.k_cache, case.v_cache, case.block_tables, query_start,
                            case.kv_lens, max(q_lens), scale, out=out)  # fmt: skip
    assert_close(out, expected)


@needs_triton
def test_triton_prefill_decode_rows_only() -> None:
    # A decode-only batch through the prefill kernel (mixed steps send every row there).
    case = make_paged(DECODE_KV_LENS, page_size=16, num_kv_heads=2, head_dim=16,
                      dtype=torch.float32, device=TRITON_DEVICE)  # fmt: skip
    num_rows = len(DECODE_KV_LENS)
    q = torch.randn(num_rows, 4, 16, device=TRITON_DEVICE)
    query_start = torch.arange(num_rows + 1, dtype=torch.int32, device=TRITON_DEVICE)
    decode = attention_reference.paged_decode_attention(
        q, case.k_cache, case.v_cache, case.block_tables, case.kv_lens, 0.25
    )
    out = paged_prefill_attention(q, case.k_cache, case.v_cache, case.block_tables, query_start,
                                  case.kv_lens, 1, 0.25)  # fmt: skip
    assert_close(out, decode)


def test_pick_num_splits() -> None:
    assert pick_num_splits(1, 8) == 16  # one row: split the context over many programs
    assert pick_num_splits(64, 8) == 1  # rows x heads already fill the GPU
    assert pick_num_splits(1, 8, max_kv_len=100) == 2  # no empty splits when the length is known
    assert 1 <= pick_num_splits(0, 8) <= 16


@needs_triton
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_triton_store_kv(slot_dtype: torch.dtype) -> None:
    page_size, num_kv_heads, head_dim, num_tokens = 5, 3, 24, 7
    dev = TRITON_DEVICE
    # k/v as strided column windows of one fused projection output, as in the model.
    fused = torch.randn(num_tokens, 2 * num_kv_heads * head_dim + 8, device=dev)
    width = num_kv_heads * head_dim
    k = fused[:, 8 : 8 + width].view(num_tokens, num_kv_heads, head_dim)
    v = fused[:, 8 + width :].view(num_tokens, num_kv_heads, head_dim)
    # Slots across page boundaries, out of order, and -1 (padding rows: write nothing).
    slots = torch.tensor([4, 5, -1, 17, 0, -1, 9], dtype=slot_dtype, device=dev)
    k_cache = torch.randn(4, page_size, num_kv_heads, head_dim, device=dev)
    v_cache = torch.randn(4, page_size, num_kv_heads, head_dim, device=dev)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    attention_reference.store_kv(k, v, k_expected, v_expected, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.cpu(), k_expected.cpu())
    assert torch.equal(v_cache.cpu(), v_expected.cpu())
    store_kv(k[:0], v[:0], k_cache, v_cache, slots[:0])  # empty step: no launch


# ---------------------------------------------------------------- GPU: Llama-3-8B shapes


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows", [1, 8, 64])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_gpu_decode_llama3_8b(dtype: torch.dtype, num_rows: int, num_splits: int | None) -> None:
    lens = [(97 * i) % 2000 + 1 for i in range(1, num_rows + 1)]
    case = make_paged(lens, page_size=16, num_kv_heads=8, head_dim=128, dtype=dtype,
                      device="cuda", seed=num_rows)  # fmt: skip
    q = torch.randn(num_rows, 32, 128, device="cuda", dtype=dtype)
    expected = attention_reference.paged_decode_attention(
        q, case.k_cache, case.v_cache, case.block_tables, case.kv_lens, 128**-0.5
    )
    out = paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables, case.kv_lens,
                                 128**-0.5, num_splits=num_splits)  # fmt: skip
    assert_close(out, expected)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_prefill_llama3_8b(dtype: torch.dtype) -> None:
    rows = [(0, 128), (0, 1), (300, 77), (16, 500), (1000, 1)]
    lens = [c + n for c, n in rows]
    case = make_paged(lens, page_size=16, num_kv_heads=8, head_dim=128, dtype=dtype,
                      device="cuda")  # fmt: skip
    q_lens = [n for _, n in rows]
    starts = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    query_start = torch.tensor(starts, dtype=torch.int32, device="cuda")
    q = torch.randn(sum(q_lens), 32, 128, device="cuda", dtype=dtype)
    expected = attention_reference.paged_prefill_attention(
        q, case.k_cache, case.v_cache, case.block_tables, query_start, case.kv_lens, 128**-0.5
    )
    out = paged_prefill_attention(q, case.k_cache, case.v_cache, case.block_tables, query_start,
                                  case.kv_lens, max(q_lens), 128**-0.5)  # fmt: skip
    assert_close(out, expected)
