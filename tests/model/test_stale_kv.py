"""Stale data in the arena never reaches another row: every attention path (reference, Triton
prefill and decode, the static decode runner's padding rows) and every LoRA path gives the same
tokens and logits whether the pages and LoRA rows it must not read hold zeros or NaN.

NaN is what a bad adapter's K/V leave behind in freed pages (and what an evicted adapter's rows
may hold); with masked positions multiplied by zero (0 x NaN = NaN) one tenant's garbage would
turn every later batch's outputs into NaN.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lorasrv.model.runner import ModelRunner
from tests.model.plan_driver import PlanDriver

ADAPTERS = ("qv_r4", "all_r8_rslora")
# Lengths around the page size (4): rows of a step pad to the longest, tables pad with page 0.
ROWS: list[tuple[list[int], int | None]] = [
    (list(range(20, 37)), 0),
    ([17], None),
    ([5, 6, 7, 8, 9], 1),
    ([42, 43], None),
    (list(range(100, 111)), 1),
]
NEW_TOKENS = 6
interpret_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU need TRITON_INTERPRET=1 set before Python starts",
)


def make_runner(base: Path, attention: str, device: str = "cpu", **kwargs: object) -> ModelRunner:
    return ModelRunner(
        model_path=str(base),
        device=device,
        page_size=4,
        num_kv_pages=192,
        enable_lora=True,
        lora_max_rank=16,
        lora_target_modules=("all",),
        lora_backend="triton" if attention == "triton" else "torch",
        attention_backend=attention,
        **kwargs,  # type: ignore[arg-type]
    )


def run_rows(
    runner: ModelRunner, adapter_dir: Callable[[str], Path], *, poison: bool
) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
    driver = PlanDriver(runner, token_budget=64, record_logits=True, lora_rows=24)
    load = runner.make_adapter_loader()
    for adapter_id, name in enumerate(ADAPTERS):
        driver.add_adapter(adapter_id, load(str(adapter_dir(name))))
    driver.flush_uploads()
    if poison:
        # Every page and every free row holds what a NaN-producing tenant left behind; only
        # the two adapters' rows keep their data.
        rows = runner.arena.rows
        assert rows is not None
        used = torch.tensor([r for rs in driver.adapter_rows.values() for r in rs])
        kept = rows[used].clone()
        runner.arena.buffer.fill_(float("nan"))
        rows[used] = kept
    prompts, adapters = [p for p, _ in ROWS], [a for _, a in ROWS]
    tokens = driver.generate(prompts, adapters, NEW_TOKENS)
    # A second batch of other tenants on pages the first one freed (still NaN where unwritten).
    tokens += driver.generate([p for p, _ in ROWS[1:4]], [None, 1, 0], NEW_TOKENS)
    return tokens, driver.first_logits


def assert_unaffected(make: Callable[[], ModelRunner], adapter_dir: Callable[[str], Path]) -> None:
    clean_tokens, clean_logits = run_rows(make(), adapter_dir, poison=False)
    tokens, logits = run_rows(make(), adapter_dir, poison=True)
    assert tokens == clean_tokens
    assert logits.keys() == clean_logits.keys()
    for seq_id, row in logits.items():
        assert bool(torch.isfinite(row).all()), f"seq {seq_id}: NaN logits from stale pages"
        torch.testing.assert_close(row, clean_logits[seq_id], atol=0, rtol=0)


def test_reference_attention_ignores_stale_pages(
    checkpoint_dir: Callable[[str], Path], adapter_dir: Callable[[str], Path]
) -> None:
    base = checkpoint_dir("llama")
    assert_unaffected(lambda: make_runner(base, "reference"), adapter_dir)


@interpret_only
def test_triton_attention_ignores_stale_pages(
    checkpoint_dir: Callable[[str], Path], adapter_dir: Callable[[str], Path]
) -> None:
    # 5 rows decode in bucket 8: three padding rows read page 0, which holds NaN.
    base = checkpoint_dir("llama")
    runner = make_runner(base, "triton")
    assert runner.decode is not None
    assert_unaffected(lambda: make_runner(base, "triton"), adapter_dir)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device, without the interpreter",
)
def test_gpu_attention_ignores_stale_pages(
    checkpoint_dir: Callable[[str], Path], adapter_dir: Callable[[str], Path]
) -> None:
    """bf16 kernels, decode replayed from CUDA graphs (padding rows on NaN page 0)."""
    base = checkpoint_dir("llama")

    def make() -> ModelRunner:
        return make_runner(base, "triton", device="cuda", dtype="bfloat16", enable_cuda_graph=True)

    assert_unaffected(make, adapter_dir)
