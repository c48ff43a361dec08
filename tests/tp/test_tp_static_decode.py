"""Decode under TP on the static path that CUDA graphs replay (run eagerly here: Triton kernels
through TRITON_INTERPRET=1, gloo between ranks): tp 2 gives tp 1's greedy tokens on mixed
base/adapter batches padded to a bucket, with every decode step of every rank on that path.
Capturing it is GPU-only (bench/tp_check.py --cuda-graph)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from lorasrv.messages import SamplingParams
from lorasrv.model.runner import ModelRunner
from lorasrv.tp.runner import TpRunner
from tests.model.plan_driver import GREEDY, PlanDriver
from tests.tp.conftest import PROMPTS, ROW_ADAPTERS, runner_options
from tests.tp.static_decode_runner import STATIC_DECODE_RUNNER

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU need TRITON_INTERPRET=1 set before Python starts",
)
KERNELS = {"attention_backend": "triton", "lora_backend": "triton"}
WITH_LOGPROBS = SamplingParams(temperature=0.0, logprobs=True)


def run(runner: Any, adapter: str, params: SamplingParams) -> tuple[list[list[int]], Any]:
    driver = PlanDriver(runner, lora_rows=16, params=params)
    driver.add_adapter(1, runner.make_adapter_loader()(adapter))
    # 3 rows: bucket 4, one padding row
    tokens = driver.generate(PROMPTS[:3], ROW_ADAPTERS[:3], max_new_tokens=4)
    return tokens, torch.tensor(driver.last_logprobs)


def test_tp2_static_decode_gives_tp1_tokens(odd_world: dict[str, Any]) -> None:
    """Greedy (the vocab-parallel argmax after the replay), then greedy with logprobs (the
    gathered logits after the replay)."""
    options = {**runner_options(odd_world["base"]), **KERNELS}
    adapter = str(odd_world["adapter"])
    tp1 = ModelRunner(**options)
    assert tp1.decode is not None
    expected = [run(tp1, adapter, GREEDY), run(tp1, adapter, WITH_LOGPROBS)]
    tp2 = TpRunner(tp_size=2, runner_class=STATIC_DECODE_RUNNER, **options)
    try:
        got = [run(tp2, adapter, GREEDY), run(tp2, adapter, WITH_LOGPROBS)]
    finally:
        tp2.shutdown()
    assert got[0][0] == expected[0][0]
    assert got[1][0] == expected[1][0] == expected[0][0]
    assert got[1][1].shape == (3, 4)
    assert torch.allclose(got[1][1], expected[1][1], atol=1e-4)
