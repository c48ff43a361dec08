"""Kernel section of bench_engine.py: achieved GB/s of the LoRA, paged-attention and KV-store
kernels at Llama-3-8B decode and prefill shapes (CUDA only; `do_bench` needs CUDA events).

Attention inputs rotate over several page sets, so a timing is not an L2 hit.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import torch

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16  # Llama-3-8B
ROTATE = 4


def _bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e-3


def _paged(kv_lens: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """K/V caches holding ROTATE disjoint page sets; tables [ROTATE, rows, max_pages]."""
    pages = [-(-n // PAGE) for n in kv_lens]
    per_set = sum(pages)
    num_pages = ROTATE * per_set
    shape = (num_pages, PAGE, KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, device="cuda", dtype=dtype)
    v = torch.randn(shape, device="cuda", dtype=dtype)
    order = torch.randperm(num_pages, device="cuda").to(torch.int32)
    tables = torch.zeros(ROTATE, len(kv_lens), max(pages), dtype=torch.int32, device="cuda")
    start = 0
    for s in range(ROTATE):
        for row, n in enumerate(pages):
            tables[s, row, :n] = order[start : start + n]
            start += n
    lens = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    return k, v, tables, lens


def _rotating(tables: torch.Tensor) -> Callable[[], torch.Tensor]:
    sets = itertools.cycle(range(ROTATE))
    return lambda: tables[next(sets)]


def _decode_row(num_rows: int, kv_len: int, dtype: torch.dtype) -> dict[str, Any]:
    from lorasrv_kernels import paged_decode_attention, pick_num_splits

    k, v, tables, lens = _paged([kv_len] * num_rows, dtype)
    q = torch.randn(num_rows, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    splits = pick_num_splits(num_rows, KV_HEADS)
    table = _rotating(tables)
    seconds = _bench(lambda: paged_decode_attention(
        q, k, v, table(), lens, HEAD_DIM**-0.5, num_splits=splits))  # fmt: skip
    nbytes = (2 * num_rows * kv_len * KV_HEADS + 2 * num_rows * HEADS) * HEAD_DIM * q.element_size()
    return {"op": "decode_attention", "rows": num_rows, "kv_len": kv_len, "splits": splits,
            "us": round(seconds * 1e6, 1), "gbps": round(nbytes / seconds / 1e9, 1)}  # fmt: skip


def _prefill_row(num_rows: int, q_len: int, prefix: int, dtype: torch.dtype) -> dict[str, Any]:
    from lorasrv_kernels import paged_prefill_attention

    kv_len = prefix + q_len
    k, v, tables, lens = _paged([kv_len] * num_rows, dtype)
    q = torch.randn(num_rows * q_len, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    starts = torch.arange(0, num_rows * q_len + 1, q_len, dtype=torch.int32, device="cuda")
    table = _rotating(tables)
    seconds = _bench(lambda: paged_prefill_attention(
        q, k, v, table(), starts, lens, q_len, HEAD_DIM**-0.5))  # fmt: skip
    visible = num_rows * sum(prefix + i + 1 for i in range(q_len))  # (query, key) pairs
    flops = 4 * visible * HEADS * HEAD_DIM
    nbytes = (2 * num_rows * kv_len * KV_HEADS + 2 * q.shape[0] * HEADS) * HEAD_DIM
    nbytes *= q.element_size()
    return {"op": "prefill_attention", "rows": num_rows, "q_len": q_len, "prefix": prefix,
            "us": round(seconds * 1e6, 1), "gbps": round(nbytes / seconds / 1e9, 1),
            "tflops": round(flops / seconds / 1e12, 1)}  # fmt: skip


def _store_row(tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    from lorasrv_kernels import store_kv

    k_cache = torch.empty(-(-tokens // PAGE) * ROTATE, PAGE, KV_HEADS, HEAD_DIM,
                          device="cuda", dtype=dtype)  # fmt: skip
    v_cache = torch.empty_like(k_cache)
    new = torch.randn(tokens, 2, KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    slots = torch.randperm(k_cache.shape[0] * PAGE, device="cuda")[:tokens].to(torch.int32)
    seconds = _bench(lambda: store_kv(new[:, 0], new[:, 1], k_cache, v_cache, slots))
    nbytes = 2 * 2 * tokens * KV_HEADS * HEAD_DIM * new.element_size()  # K and V, read + write
    return {"op": "store_kv", "tokens": tokens, "us": round(seconds * 1e6, 1),
            "gbps": round(nbytes / seconds / 1e9, 1)}  # fmt: skip


def attention_rows(dtype: torch.dtype) -> list[dict[str, Any]]:
    rows = [_decode_row(n, kv, dtype) for n, kv in ((1, 4096), (64, 192), (64, 2048))]
    rows += [
        _prefill_row(n, q, c, dtype) for n, q, c in ((64, 128, 0), (1, 2048, 0), (8, 256, 1024))
    ]
    rows += [_store_row(tokens, dtype) for tokens in (64, 8192)]
    return rows


def lora_rows(dtype: torch.dtype) -> list[dict[str, Any]]:
    import bench_kernels

    rows: list[dict[str, Any]] = []
    for module in bench_kernels.MODULES:
        for num_tokens in (64, 4096):  # a decode batch, a prefill chunk; 8 adapters each
            rows += bench_kernels.bench_case(module, num_tokens, 8, dtype)
    return rows


def run(device: torch.device, small: bool, data: dict[str, Any]) -> None:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        data["kernels"] = "skipped: kernel timings need CUDA (do_bench uses CUDA events)"
        return
    dtype = torch.bfloat16
    out: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    data["kernels"], data["kernels_summary"] = out, summary
    for name, fn in (("attention", attention_rows), ("lora", lora_rows)):
        try:
            out[name] = fn(dtype)
        except Exception as exc:  # keep the other group
            out[name] = f"{type(exc).__name__}: {exc}"
    for row in out.get("attention", []) if isinstance(out.get("attention"), list) else []:
        shape = "x".join(str(row[k]) for k in ("rows", "kv_len", "q_len", "tokens") if k in row)
        summary[f"{row['op']}_{shape}_gbps"] = row["gbps"]
    for row in out.get("lora", []) if isinstance(out.get("lora"), list) else []:
        if row["op"] == "lora_forward":
            key = f"lora_{row['module']}_T{row['num_tokens']}"
            summary[key + "_gbps"] = row["triton_gbps"]
            summary[key + "_vs_torch"] = row["speedup"]
