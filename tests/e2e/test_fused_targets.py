"""Over HTTP, as SGLang counts them: q/k/v are one fused module and gate/up another, so with
`--lora-target-modules q_proj v_proj gate_proj` adapters on k_proj or on up_proj load, and their
greedy tokens equal PEFT's (the k and up slices are really applied)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.e2e.conftest import PROMPTS, greedy, make_checkpoint, reference_models, server_config
from tests.model.checkpoints import build_adapter

NUM_NEW = 8
SHAPES = {"qkv": ["q_proj", "k_proj", "v_proj"], "up": ["up_proj"], "o": ["o_proj"]}


async def test_fused_partners_of_targeted_modules_load(tmp_path: Path, lorasrv_client: Any) -> None:
    base = make_checkpoint(tmp_path)
    adapters = {
        name: build_adapter(base, tmp_path / name, r=4, target_modules=modules, seed=i + 3)
        for i, (name, modules) in enumerate(SHAPES.items())
    }
    client = await lorasrv_client(
        server_config(
            base,
            enable_lora=True,
            max_lora_rank=8,
            lora_target_modules=["q_proj", "v_proj", "gate_proj"],
        )
    )
    for name in ("qkv", "up"):
        load = {"lora_name": name, "lora_path": str(adapters[name])}
        resp = await client.post("/load_lora_adapter", json=load)
        assert resp.status == 200, await resp.text()
    resp = await client.post(
        "/load_lora_adapter", json={"lora_name": "o", "lora_path": str(adapters["o"])}
    )
    assert resp.status == 400  # o_proj is no partner of a targeted module: still refused
    assert "--lora-target-modules" in (await resp.json())["error_message"]
    body = {
        "input_ids": [PROMPTS[0], PROMPTS[3]],
        "lora_path": ["qkv", "up"],
        "sampling_params": {"max_new_tokens": NUM_NEW, "temperature": 0, "ignore_eos": True},
    }
    resp = await client.post("/generate", json=body)
    assert resp.status == 200, await resp.text()
    got = [item["output_ids"] for item in await resp.json()]
    models = reference_models(base, {n: adapters[n] for n in ("qkv", "up")})
    assert got == [
        greedy(models["qkv"], PROMPTS[0], NUM_NEW),
        greedy(models["up"], PROMPTS[3], NUM_NEW),
    ]
