"""LoRA under TP on the single-GPU engine's row paths (S-LoRA shards: B split for q/k/v and
gate/up, A split for o and down), tp 2 against tp 1 on one batch of base rows and three adapters
of ranks 4, 8 and 16 with different targets (per-module rank and alpha patterns included):

- the torch backend, eager (reference attention);
- the Triton backend (TRITON_INTERPRET=1): eager prefill, and decode on the static path that
  CUDA graphs replay (run eagerly here), every decode step of every rank asserted on it; greedy
  steps take the vocab-parallel argmax, steps with logprobs the gathered logits.

Capturing the static path is GPU-only (bench/tp_check.py --cuda-graph).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from lorasrv.messages import SamplingParams
from lorasrv.model.runner import ModelRunner
from lorasrv.tp.runner import TpRunner
from tests.model.plan_driver import GREEDY, PlanDriver
from tests.tp.conftest import ADAPTER_NAMES, PROMPTS, runner_options
from tests.tp.static_decode_runner import STATIC_DECODE_RUNNER

DEFAULT_RUNNER = "lorasrv.model.runner:ModelRunner"
WITH_LOGPROBS = SamplingParams(temperature=0.0, logprobs=True)
ROWS = [*PROMPTS, [3, 1, 4, 1, 5, 9, 2, 6]]  # 5 rows: decode bucket 8, three padding rows
ROW_ADAPTERS = [None, 1, 2, 3, 1]  # base + the three adapters
BACKENDS = {
    "torch": {"lora_backend": "torch"},
    "triton": {"lora_backend": "triton", "attention_backend": "triton"},
}


def generate(
    runner: Any, adapters: dict[str, Any], params: SamplingParams
) -> tuple[list[list[int]], torch.Tensor]:
    driver = PlanDriver(runner, lora_rows=32, params=params)
    load = runner.make_adapter_loader()
    for adapter_id, name in enumerate(ADAPTER_NAMES, start=1):
        driver.add_adapter(adapter_id, load(str(adapters[name])))
    tokens = driver.generate(ROWS, ROW_ADAPTERS, max_new_tokens=4)
    return tokens, torch.tensor(driver.last_logprobs)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_mixed_adapters_give_tp1_tokens(odd_world: dict[str, Any], backend: str) -> None:
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU need TRITON_INTERPRET=1 set before Python starts")
    options = {**runner_options(odd_world["base"]), **BACKENDS[backend], "num_kv_pages": 1024}
    adapters = odd_world["adapters"]
    tp1 = ModelRunner(**options)
    assert (tp1.decode is not None) == (backend == "triton")
    expected = [generate(tp1, adapters, GREEDY), generate(tp1, adapters, WITH_LOGPROBS)]
    base_only = PlanDriver(tp1).generate(ROWS[1:2], max_new_tokens=4)
    del tp1
    runner_class = STATIC_DECODE_RUNNER if backend == "triton" else DEFAULT_RUNNER
    tp2 = TpRunner(tp_size=2, runner_class=runner_class, **options)
    try:
        got = [generate(tp2, adapters, GREEDY), generate(tp2, adapters, WITH_LOGPROBS)]
    finally:
        tp2.shutdown()
    assert got[0][0] == expected[0][0]
    assert got[1][0] == expected[1][0] == expected[0][0]
    assert got[1][1].shape == (len(ROWS), 4)
    assert torch.allclose(got[1][1], expected[1][1], atol=1e-4)
    assert base_only[0] != expected[0][0][1], "the adapter changed nothing: the test is vacuous"
