"""The stacked LoRA path (the shrink out of the base GEMM, `x @ [W; A].T`) against the two-op
path (shrink then expand), layer by layer and through a whole runner, on CPU."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lorasrv_kernels import SlotBatchInfo, prepare_slot_batch_info, reference, triton_lora_forward

from lorasrv.model import layers
from lorasrv.model.layers import LoraLinear, LoraOp, LoraStep, make_lora_step
from lorasrv.model.runner import ModelRunner
from tests.model.plan_driver import PlanDriver

HAS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
OPS: list[LoraOp] = [reference.lora_forward]
if HAS_INTERPRET:  # the Triton ops run on CPU only in the interpreter
    OPS.append(triton_lora_forward)

NUM_SLOTS, MAX_RANK, IN_FEATURES = 3, 8, 24
SLICES = (16, 8, 8)  # q/k/v-like


def make_linear(*, bias: bool, seed: int = 0) -> tuple[LoraLinear, SlotBatchInfo]:
    gen = torch.Generator().manual_seed(seed)
    out_total = sum(SLICES)
    weight = torch.randn(out_total, IN_FEATURES, generator=gen)
    linear = LoraLinear(weight, torch.randn(out_total, generator=gen) if bias else None, SLICES)
    a = torch.randn(NUM_SLOTS * len(SLICES) * MAX_RANK, IN_FEATURES, generator=gen) * 0.3
    ranks = [8, 0, 4]
    a_view = a.view(NUM_SLOTS, len(SLICES), MAX_RANK, IN_FEATURES)
    b = torch.randn(NUM_SLOTS, out_total, MAX_RANK, generator=gen) * 0.3
    for slot, rank in enumerate(ranks):  # the pool's invariant: zeros past each rank
        a_view[slot, :, rank:] = 0
        b[slot, :, rank:] = 0
    linear.attach_lora(torch.cat([weight, a]), b, NUM_SLOTS)
    # base rows, slot 0, the empty slot 1, slot 2
    info = prepare_slot_batch_info([2, 3, 1, 4], [-1, 0, 1, 2], ranks, [0.5, 1.0, 2.0])
    return linear, info


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bias", [False, True])
def test_stacked_linear_matches_two_op_path(op: LoraOp, bias: bool) -> None:
    linear, info = make_linear(bias=bias)
    x = torch.randn(10, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    stacked_step = make_lora_step(info, op, num_tokens=x.shape[0])
    assert stacked_step.expand_stacked is not None
    y_stacked = linear.forward(x, stacked_step)
    y_two_op = linear.forward(x, LoraStep(info=info, op=op))
    # The stacked output is a window of the wider GEMM output; the two-op one is not.
    assert y_stacked.stride(0) == linear.stacked.shape[0]  # type: ignore[union-attr]
    assert y_two_op.stride(0) == sum(SLICES)
    torch.testing.assert_close(y_stacked, y_two_op, atol=1e-5, rtol=1e-5)
    # Base rows (segment 0) and the rank-0 slot's row (token 5) get the base output only.
    y_base = linear.forward(x, None)
    torch.testing.assert_close(y_stacked[:2], y_base[:2])
    torch.testing.assert_close(y_stacked[5], y_base[5])
    assert not torch.allclose(y_stacked[2:5], y_base[2:5])  # the adapters do change the rest


def test_attach_keeps_the_weight_and_shares_the_a_stack() -> None:
    linear, _ = make_linear(bias=True)
    assert linear.stacked is not None
    assert linear.a_stack is not None
    assert linear.weight.data_ptr() == linear.stacked.data_ptr()
    assert linear.a_stack.shape == (NUM_SLOTS, len(SLICES) * MAX_RANK, IN_FEATURES)
    # Writing a slot through the A stack is what the stacked GEMM then reads.
    linear.a_stack[2].fill_(0.0)
    assert bool((linear.stacked[sum(SLICES) + 2 * len(SLICES) * MAX_RANK :] == 0).all())


def test_large_steps_take_the_two_op_path() -> None:
    _, info = make_linear(bias=False)
    op = reference.lora_forward
    assert make_lora_step(info, op, layers.STACKED_MAX_TOKENS).expand_stacked is not None
    assert make_lora_step(info, op, layers.STACKED_MAX_TOKENS + 1).expand_stacked is None


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: q/k/v bias under the A rows
def test_runner_stacked_matches_two_op_path(
    checkpoint_dir: Callable[[str], Path],
    adapter_dir: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    def run() -> tuple[list[list[int]], dict[int, torch.Tensor]]:
        runner = ModelRunner(
            model_path=str(checkpoint_dir(kind)),
            device="cpu",
            page_size=4,
            num_kv_pages=64,
            lora_num_slots=2,
            lora_max_rank=16,
            lora_target_modules=("all",),
            lora_backend="torch",
            attention_backend="reference",
        )
        load = runner.make_adapter_loader()
        for slot, name in enumerate(("qv_r4", "all_r8_rslora")):
            runner.load_slot(slot, slot, load(str(adapter_dir(name, kind))))  # type: ignore[arg-type]
        driver = PlanDriver(runner, token_budget=64, record_logits=True)
        prompts = [[5, 6, 7], list(range(20, 31)), [17, 18]]
        tokens = driver.generate(prompts, [-1, 0, 1], 6)
        return tokens, dict(driver.first_logits)

    stacked_tokens, stacked_logits = run()
    monkeypatch.setattr(layers, "STACKED_MAX_TOKENS", 0)  # every step: shrink + expand
    tokens, logits = run()
    assert stacked_tokens == tokens
    assert stacked_logits.keys() == logits.keys()
    for seq_id, row in logits.items():
        torch.testing.assert_close(stacked_logits[seq_id], row, atol=1e-4, rtol=1e-4)
