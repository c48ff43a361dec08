"""ModelRunner vs HF transformers on tiny checkpoints: greedy tokens identical, logits close.

Driven through StepPlans by a test scheduler: shuffled pages, chunked prefill, mixed decode rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import torch

from lorasrv.ids import AdapterId, BlockId, SeqId, StepId
from lorasrv.messages import AdapterRows, HostCopyReady, StepPlan, StepResult
from lorasrv.model.runner import ModelRunner
from tests.model.checkpoints import KINDS
from tests.model.plan_driver import PlanDriver

# 40 tokens take three 16-token chunks; the others prefill while earlier rows decode.
PROMPTS = [list(range(20, 60)), [5, 6, 7, 8, 9, 10, 11], list(range(100, 123)), [200]]
MAX_NEW_TOKENS = 32


def hf_greedy(
    model_dir: Path, prompts: list[list[int]]
) -> tuple[list[list[int]], list[torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokens, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=None
            )
            tokens.append(out[0, len(prompt) :].tolist())
            logits.append(model(ids).logits[0, -1].float())
    return tokens, logits


def make_runner(model_dir: Path, **kwargs: object) -> ModelRunner:
    return ModelRunner(
        model_path=str(model_dir), device="cpu", page_size=4, num_kv_pages=160, **kwargs
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_hf(kind: str, checkpoint_dir: Callable[[str], Path]) -> None:
    model_dir = checkpoint_dir(kind)
    runner = make_runner(model_dir)
    driver = PlanDriver(runner, token_budget=16, record_logits=True)
    ours = driver.generate(PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
    expected, expected_logits = hf_greedy(model_dir, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert len(expected[i]) == MAX_NEW_TOKENS
        assert len(set(expected[i])) > 8, "degenerate continuation: the test would prove little"
        assert ours[i] == expected[i], f"{kind} prompt {i} (len {len(prompt)})"
        torch.testing.assert_close(driver.first_logits[i], expected_logits[i], atol=1e-4, rtol=1e-4)
    assert driver.num_steps > MAX_NEW_TOKENS  # chunked prefill took extra steps


def test_ready_reports_facts(checkpoint_dir: Callable[[str], Path]) -> None:
    runner = make_runner(checkpoint_dir("llama"), context_length=100)
    ready = runner.ready()
    assert (ready.num_kv_pages, ready.page_size, ready.vocab_size) == (160, 4, 256)
    assert ready.context_length == 100
    assert ready.eos_token_ids == (2,)
    assert (ready.device, ready.dtype) == ("cpu", "float32")
    assert (ready.lora_max_rows, ready.lora_row_bytes) == (0, 0)  # LoRA off: no rows
    # 2 (K, V) * 2 layers * 4 tokens * 2 kv heads * 16 head_dim * 4 bytes
    assert ready.kv_page_bytes == 2048


def test_ready_reports_the_arena(checkpoint_dir: Callable[[str], Path]) -> None:
    runner = make_runner(
        checkpoint_dir("llama"), enable_lora=True, lora_max_rank=8, lora_target_modules=("all",)
    )
    ready = runner.ready()
    # Per layer: q/k/v A 3*64, B 64+32+32; o 64, 64; gate/up 2*64, 2*128; down 128, 64 (x 4 bytes)
    assert ready.lora_row_bytes == 2 * (192 + 128 + 64 + 64 + 128 + 256 + 128 + 64) * 4
    arena_bytes = ready.num_kv_pages * ready.kv_page_bytes
    assert ready.lora_max_rows == arena_bytes // ready.lora_row_bytes
    assert (ready.max_lora_rank, ready.lora_target_modules[0]) == (8, "q_proj")


def test_kv_pages_from_byte_budget(checkpoint_dir: Callable[[str], Path]) -> None:
    runner = ModelRunner(
        model_path=str(checkpoint_dir("llama")), device="cpu", page_size=16, kv_cache_bytes=1 << 20
    )
    # 2 (K, V) * 2 layers * 16 tokens * 2 kv heads * 16 head_dim * 4 bytes = 8 KiB per page
    assert runner.num_kv_pages == (1 << 20) // 8192


def test_empty_and_free_only_plans(checkpoint_dir: Callable[[str], Path]) -> None:
    runner = make_runner(checkpoint_dir("llama"))
    result = runner.step(StepPlan(step_id=StepId(0)))
    assert result == StepResult()


def test_prefill_without_sampling_then_decode(checkpoint_dir: Callable[[str], Path]) -> None:
    """A row that only prefills yields nothing; the batch of one prompt equals the batch of many."""
    model_dir = checkpoint_dir("llama")
    alone = PlanDriver(make_runner(model_dir), token_budget=5).generate(
        [PROMPTS[0]], max_new_tokens=8
    )
    batched = PlanDriver(make_runner(model_dir), token_budget=64).generate(
        PROMPTS, max_new_tokens=8
    )
    assert alone[0] == batched[0]


def one_row_plan(pages: tuple[int, ...]) -> StepPlan:
    return StepPlan(
        step_id=StepId(0),
        seq_ids=(SeqId(0),),
        input_ids=(1, 2, 3, 4, 5),
        query_lens=(5,),
        context_lens=(0,),
        block_tables=(tuple(BlockId(p) for p in pages),),
        lora_adapters=(-1,),
        sample_rows=(False,),
    )


def test_bad_block_tables_are_refused(checkpoint_dir: Callable[[str], Path]) -> None:
    runner = make_runner(checkpoint_dir("llama"))  # page_size 4, 160 pages
    with pytest.raises(ValueError, match="does not cover"):
        runner.forward(one_row_plan((0,)))
    with pytest.raises(ValueError, match="outside"):
        runner.forward(one_row_plan((0, 160)))
    assert runner.forward(one_row_plan((0, 159))).shape == (0, 256)


def test_plans_that_break_the_arena_are_refused(
    checkpoint_dir: Callable[[str], Path], adapter_dir: Callable[[str], Path]
) -> None:
    """A KV page under the rows of the step's adapters would overwrite an adapter; a row index
    outside `adapters` would read garbage: both are refused on the host, before any work."""
    runner = make_runner(
        checkpoint_dir("llama"), enable_lora=True, lora_max_rank=8, lora_target_modules=("all",)
    )
    host = runner.make_adapter_loader()(str(adapter_dir("qv_r4")))
    copy = HostCopyReady(adapter_id=AdapterId(3), weights=host, rank=4, scaling=host.scaling)
    runner.add_host_copy(copy)
    top = runner.ready().lora_max_rows
    placed = AdapterRows(AdapterId(3), tuple(range(top - 4, top)))
    under = runner.lora.geometry.pages_of_row(top - 4).start  # type: ignore[union-attr]
    plan = msgspec.structs.replace(
        one_row_plan((0, under)), lora_adapters=(0,), adapters=(placed,), uploads=(placed,)
    )
    with pytest.raises(ValueError, match="under LoRA rows"):
        runner.forward(plan)
    fine = msgspec.structs.replace(plan, block_tables=((BlockId(0), BlockId(under - 1)),))
    assert runner.forward(fine).shape == (0, 256)
    with pytest.raises(ValueError, match=r"index into plan\.adapters"):
        runner.forward(msgspec.structs.replace(fine, lora_adapters=(1,)))
    with pytest.raises(ValueError, match="never sent"):
        runner.forward(msgspec.structs.replace(fine, adapters=(AdapterRows(AdapterId(9), (1,)),)))
