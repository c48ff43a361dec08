"""A thousand adapters registered, through the real engine on CPU: tiny q/k/v/o adapters of ranks
8 and 16, `--max-loaded-loras` bounding the host copies and the arena's rows holding a handful on
the GPU. Zipf traffic over all thousand: every request finishes, the adapters checked match PEFT,
the host cap holds, dropped copies were read back from disk, and the event loop never stalled
while they loaded."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasrv.config import build_config
from lorasrv.engine import invariants
from lorasrv.engine.engine import Engine
from lorasrv.engine.requests import Submission
from lorasrv.messages import SamplingParams
from tests.e2e.conftest import PROMPTS, greedy, make_checkpoint
from tests.model.checkpoints import build_adapter

NUM_ADAPTERS = 1000
HOST_CAP = 24
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
NUM_NEW = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The base, and 1,000 adapter folders: two PEFT-made ones (ranks 8, 16), each copied with
    its own seeded perturbation, so every adapter has its own weights."""
    root = tmp_path_factory.mktemp("many")
    base = make_checkpoint(root)
    seeds = [
        build_adapter(base, root / f"seed{r}", r=r, lora_alpha=2 * r, target_modules=ATTN, seed=r)
        for r in (8, 16)
    ]
    tensors = [load_file(str(s / "adapter_model.safetensors")) for s in seeds]
    folders = []
    for i in range(NUM_ADAPTERS):
        folder = root / f"m{i}"
        folder.mkdir()
        shutil.copy(seeds[i % 2] / "adapter_config.json", folder)
        generator = torch.Generator().manual_seed(i)
        mine = {
            k: v + 0.05 * torch.randn(v.shape, generator=generator)
            for k, v in tensors[i % 2].items()
        }
        save_file(mine, str(folder / "adapter_model.safetensors"))
        folders.append(folder)
    assert json.loads((folders[1] / "adapter_config.json").read_text())["r"] == 16
    return {"base": base, "folders": folders}


def zipf_names(num: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / k for k in range(1, NUM_ADAPTERS + 1)]
    return [f"m{i}" for i in rng.choices(range(NUM_ADAPTERS), weights=weights, k=num)]


async def test_a_thousand_registered_served_under_a_host_cap(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stall bound is the server's: with the suite's invariant checks on, every adapter
    # message rechecks all 1,000 versions (O(n) each, test-only), which alone stalls ~2 s.
    monkeypatch.setattr(invariants, "enabled", False)
    config = build_config({
        "model_path": str(world["base"]), "device": "cpu", "dtype": "float32", "page_size": 4,
        "num_kv_pages": 160, "chunked_prefill_size": 64, "max_running_requests": 16,
        "enable_lora": True, "max_lora_rank": 16, "lora_target_modules": ATTN,
        "max_loaded_loras": HOST_CAP, "lora_backend": "torch",
    })  # fmt: skip
    stalls: list[float] = []

    async def ticker() -> None:  # the longest the event loop went without running us
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            stalls.append(now - last - 0.01)
            last = now

    async with asyncio.timeout(600), Engine(config) as engine:
        tick = asyncio.create_task(ticker())
        folders = world["folders"]
        done = await asyncio.gather(
            *(engine.load_adapter(f"m{i}", str(folders[i])) for i in range(NUM_ADAPTERS))
        )
        assert all(d.success for d in done)
        names = zipf_names(48, seed=5)
        params = SamplingParams(max_new_tokens=NUM_NEW, temperature=0, ignore_eos=True)
        handles = [
            engine.submit(
                Submission(input_ids=tuple(PROMPTS[i % 4]), lora_name=name, params=params)
            )
            for i, name in enumerate(names)
        ]
        results = await asyncio.gather(*(h.result() for h in handles))
        statuses = {s.name: s for s in await engine.describe_adapters()}
        tick.cancel()
    assert len(statuses) == NUM_ADAPTERS
    assert all(r.finish_reason == "length" and len(r.token_ids) == NUM_NEW for r in results)
    assert sum(s.host == "loaded" for s in statuses.values()) <= HOST_CAP
    used = set(names)
    assert len(used) > HOST_CAP  # more adapters than host copies: some were read back from disk
    assert sum(statuses[n].num_loads >= 2 for n in used) >= len(used) - HOST_CAP
    assert all(s.num_refs == 0 for s in statuses.values())
    assert sum(s.num_evictions for s in statuses.values()) > 0  # rows for a few: GPU evictions
    assert max(stalls) < 2.0, f"the event loop stalled {max(stalls):.2f} s"
    # three of them (one of each rank at least) against PEFT, row by row
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in sorted(used, key=lambda n: int(n[1:]))[:3]:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(world["base"]), world["folders"][int(name[1:])]
        ).eval()
        for i, (row, got) in enumerate(zip(names, results, strict=True)):
            if row == name:
                assert list(got.token_ids) == greedy(model, PROMPTS[i % 4], NUM_NEW), (name, i)
