"""TP on two GPUs: decode graphs captured with NCCL all-reduces inside on every rank, replayed
step after step, eager collectives between replays (the vocab-parallel argmax, the gathered
logits), tp 2 against tp 1 with graphs too, on base rows and three adapters in one batch.

float32 (no TF32): the sums differ only in order, and this checkpoint's greedy picks are far from
ties, so tokens must be equal; bf16 figures are bench/tp_check.py's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorasrv.model.runner import ModelRunner
from lorasrv.tp.runner import TpRunner
from tests.model.plan_driver import GREEDY
from tests.tp.conftest import runner_options
from tests.tp.static_decode_runner import STATIC_DECODE_RUNNER
from tests.tp.test_tp_lora import ROWS, WITH_LOGPROBS, generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


def test_tp2_graphs_give_tp1_tokens(odd_world: dict[str, Any]) -> None:
    options = {
        **runner_options(odd_world["base"]),
        "device": "cuda",
        "num_kv_pages": 1024,
        "lora_backend": "triton",
        "attention_backend": "triton",
        "enable_cuda_graph": True,
        "cuda_graph_max_batch_size": 16,
    }
    adapters = odd_world["adapters"]
    tp1 = ModelRunner(**options)
    assert tp1.decode is not None
    assert tp1.decode.use_graphs
    expected = [generate(tp1, adapters, GREEDY), generate(tp1, adapters, WITH_LOGPROBS)]
    tp1.shutdown()
    tp2 = TpRunner(tp_size=2, runner_class=STATIC_DECODE_RUNNER, **options)
    try:  # each worker asserts its graphs were captured and every decode step replays one
        got = [generate(tp2, adapters, GREEDY), generate(tp2, adapters, WITH_LOGPROBS)]
        again = generate(tp2, adapters, GREEDY)  # replays after eager gathers stay in step
    finally:
        tp2.shutdown()
    assert got[0][0] == expected[0][0]
    assert got[1][0] == expected[1][0]
    assert again[0] == expected[0][0]
    assert got[1][1].shape == (len(ROWS), 4)
    assert torch.allclose(got[1][1], expected[1][1], atol=1e-3)
