"""The overlap schedule through the real Engine on CPU, with the CUDA code paths run by the Triton
interpreter (kernel attention and LoRA, the static decode path): the scheduler plans each step
before the previous one's tokens are back, continuing rows read them on the device, and results
come one step late. The tokens equal those of `--disable-overlap-schedule` across rows stopping at
different steps (by length, by a stop token, by a stop string), adapters uploaded and evicted
between steps, preemptions (few KV pages), and sampled rows with seeds and penalties."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from lorasrv.config import build_config
from lorasrv.engine.engine import Engine
from lorasrv.engine.parts import prepare_parts
from lorasrv.engine.requests import Submission
from lorasrv.engine.results import RequestResult
from lorasrv.engine.stats import SchedulerStats
from lorasrv.messages import SamplingParams
from lorasrv.model.runner import ModelRunner
from tests.e2e.conftest import PROMPTS, make_adapters, make_checkpoint

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU need TRITON_INTERPRET=1 set before Python starts",
)

ADAPTERS = ("qv_r4", "all_r8_rslora", "mlp_r16_patterns")
PAGES = 80  # KV keeps 16 pages when adapters hold their rows: growing rows get preempted
GREEDY = {"temperature": 0.0, "ignore_eos": True}
PENALIZED = {"temperature": 0.9, "top_p": 0.9, "seed": 7, "repetition_penalty": 1.3,
             "frequency_penalty": 0.4, "presence_penalty": 0.2, "logprobs": True}  # fmt: skip
# prompt, adapter, max_new_tokens, sampling: three adapters, two a batch, rows for 16 ranks
ROWS: list[tuple[list[int], str | None, int, dict[str, Any]]] = [
    (PROMPTS[0], None, 9, GREEDY),
    (PROMPTS[0], "qv_r4", 5, GREEDY),
    (PROMPTS[1], "all_r8_rslora", 12, GREEDY),
    (PROMPTS[2], "mlp_r16_patterns", 7, GREEDY),
    (PROMPTS[3], "all_r8_rslora", 3, GREEDY),
    (PROMPTS[1], None, 10, GREEDY),
    (PROMPTS[3], None, 10, PENALIZED),
    (
        PROMPTS[0],
        "qv_r4",
        8,
        {"temperature": 1.1, "top_k": 20, "seed": 11, "frequency_penalty": 0.5},
    ),
]


def submission(prompt: list[int], lora: str | None, num: int, **params: Any) -> Submission:
    return Submission(input_ids=tuple(prompt), lora_name=lora,
                      params=SamplingParams(max_new_tokens=num, **params))  # fmt: skip


def stopping(first: list[RequestResult]) -> list[Submission]:
    """The second pass's rows that stop early, derived from the first pass's outputs: row 5
    again with one of its tokens as a stop token, row 0 with a piece of its text as a stop
    string (greedy: the same tokens come again, so each stops part-way)."""
    by_token = submission(PROMPTS[1], None, 10, stop_token_ids=(first[5].token_ids[4],), **GREEDY)
    text = first[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    by_text = submission(PROMPTS[0], None, 9, stop=(stop,), **GREEDY)
    return [by_token, by_text]


async def run(
    base: Path, adapters: dict[str, Path], overlap: bool
) -> tuple[list[list[RequestResult]], SchedulerStats, int]:
    config = build_config({
        "model_path": str(base), "device": "cpu", "dtype": "float32", "page_size": 4,
        "num_kv_pages": PAGES, "chunked_prefill_size": 24, "port": 0,
        "max_loras_per_batch": 2, "max_lora_rank": 16, "lora_target_modules": ["all"],
        "enable_lora": True, "disable_overlap_schedule": not overlap,
    })  # fmt: skip
    parts = await prepare_parts(config)

    def build() -> ModelRunner:
        return ModelRunner(
            model_path=str(base), device="cpu", dtype="float32", page_size=4, num_kv_pages=PAGES,
            enable_lora=True, lora_max_rank=16, lora_target_modules=("all",),
            lora_backend="triton", attention_backend="triton",
        )  # fmt: skip

    parts = parts._replace(runner_factory=build)
    async with asyncio.timeout(400), Engine(config, parts=parts) as engine:
        for name in ADAPTERS:
            result = await engine.load_adapter(name, str(adapters[name]))
            assert result.success, result.error_message
        outputs: list[list[RequestResult]] = []
        for _ in range(2):  # the second pass finds other adapters on the GPU
            rows = [submission(p, name, n, **params) for p, name, n, params in ROWS]
            if outputs:
                rows += stopping(outputs[0])
            handles = [engine.submit(row) for row in rows]
            outputs.append(list(await asyncio.gather(*(h.result() for h in handles))))
        evictions = sum(s.num_evictions for s in await engine.describe_adapters())
        return outputs, engine.last_stats, evictions


def comparable(result: RequestResult) -> tuple[Any, ...]:
    logprobs = tuple(round(x, 4) for x in result.logprobs)
    return (result.token_ids, result.text, result.finish_reason, result.matched_stop, logprobs)


async def test_overlap_schedule_gives_the_same_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = make_checkpoint(tmp_path)
    adapters = make_adapters(base, tmp_path, ADAPTERS)
    caplog.set_level(logging.INFO, logger="lorasrv.engine.scheduler")

    def num_preemptions() -> int:
        return sum("preempted" in r.message for r in caplog.records)

    expected, serial, _ = await run(base, adapters, overlap=False)
    serial_preemptions = num_preemptions()
    outputs, overlapped, evictions = await run(base, adapters, overlap=True)
    assert [[comparable(r) for r in p] for p in outputs] == [
        [comparable(r) for r in p] for p in expected
    ]
    lengths = [len(r.token_ids) for r in outputs[0]]
    assert lengths == [n for _, _, n, _ in ROWS]  # rows stopped at different steps
    by_token, by_text = outputs[1][len(ROWS) :]
    assert by_token.finish_reason == "stop"
    assert len(by_token.token_ids) <= 5
    assert by_text.finish_reason == "stop"
    assert by_text.matched_stop not in by_text.text
    assert evictions > 0
    assert serial_preemptions > 0
    assert num_preemptions() > serial_preemptions
    assert len(outputs[0][6].logprobs) == 10  # the sampled row's logprobs came through
    # the serial run planned every step after the previous one's tokens; the overlapped one
    # planned most steps while the previous one ran, and dropped the tokens sampled for rows
    # that had stopped on a token meanwhile
    assert serial.num_steps_overlapped == 0
    assert overlapped.num_steps_overlapped >= overlapped.num_steps // 2
    assert overlapped.num_tokens_dropped >= 1
