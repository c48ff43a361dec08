"""The overlap schedule through the real Engine on CPU, with the CUDA code paths run by the Triton
interpreter: the scheduler reserves next-token pages, the runner launches decode steps ahead, and
the greedy tokens equal those of `--disable-overlap-schedule`, across rows that stop at different
steps (left out of the guesses) and adapters loaded and evicted between batches (a slot load
drops a pending guess)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from lorasrv.config import build_config
from lorasrv.engine.engine import Engine
from lorasrv.engine.parts import prepare_parts
from lorasrv.engine.requests import Submission
from lorasrv.messages import SamplingParams
from lorasrv.model.runner import ModelRunner
from tests.e2e.conftest import PROMPTS, make_adapters, make_checkpoint

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU need TRITON_INTERPRET=1 set before Python starts",
)

ADAPTERS = ("qv_r4", "all_r8_rslora", "mlp_r16_patterns")
# Three adapters, two slots: batches wait for slots and idle adapters are evicted.
ROWS: list[tuple[list[int], str | None, int]] = [
    (PROMPTS[0], None, 9),
    (PROMPTS[0], "qv_r4", 5),
    (PROMPTS[1], "all_r8_rslora", 12),
    (PROMPTS[2], "mlp_r16_patterns", 7),
    (PROMPTS[3], "all_r8_rslora", 3),
    (PROMPTS[1], None, 10),
]


async def run(base: Path, adapters: dict[str, Path], overlap: bool) -> tuple[Any, ModelRunner]:
    config = build_config({
        "model_path": str(base), "device": "cpu", "dtype": "float32", "page_size": 4,
        "num_kv_pages": 128, "chunked_prefill_size": 24, "port": 0,
        "max_loras_per_batch": 2, "max_lora_rank": 16, "lora_target_modules": ["all"],
        "enable_lora": True,
        "disable_overlap_schedule": not overlap,
    })  # fmt: skip
    parts = await prepare_parts(config)
    built: list[ModelRunner] = []

    def build() -> ModelRunner:
        built.append(ModelRunner(
            model_path=str(base), device="cpu", dtype="float32", page_size=4, num_kv_pages=128,
            enable_lora=True, lora_max_rank=16, lora_target_modules=("all",),
            lora_backend="triton", attention_backend="triton", enable_lookahead=overlap,
        ))  # fmt: skip
        return built[-1]

    parts = parts._replace(runner_factory=build)
    async with asyncio.timeout(300), Engine(config, parts=parts) as engine:
        for name in ADAPTERS:
            result = await engine.load_adapter(name, str(adapters[name]))
            assert result.success, result.error_message
        outputs = []
        for _ in range(2):  # the second pass finds other adapters in the slots
            handles = [
                engine.submit(Submission(
                    input_ids=tuple(p), lora_name=name,
                    params=SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True),
                ))
                for p, name, n in ROWS
            ]  # fmt: skip
            results = await asyncio.gather(*(handle.result() for handle in handles))
            outputs.append([list(r.token_ids) for r in results])
        evictions = sum(s.num_evictions for s in await engine.describe_adapters())
    return (outputs, evictions), built[0]


async def test_overlap_schedule_gives_the_same_tokens(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path)
    adapters = make_adapters(base, tmp_path, ADAPTERS)
    (expected, _), step_by_step = await run(base, adapters, overlap=False)
    (outputs, evictions), ahead = await run(base, adapters, overlap=True)
    assert outputs == expected
    assert [len(t) for t in outputs[0]] == [n for _, _, n in ROWS]
    assert evictions > 0
    assert step_by_step.num_guesses_used == 0
    # 14 used, 2 dropped when written (slot loads). Before the scheduler's hints it was 10 and
    # 14: guesses launched while a prefill was due, and with rows about to stop by length.
    assert ahead.num_guesses_used >= 10
    assert ahead.num_guesses_dropped <= 4
