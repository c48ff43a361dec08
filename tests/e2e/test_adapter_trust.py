"""Over HTTP with the real engine: adapters built to break the server (the issue's huge alpha,
NaN/Inf weights, absurd names) are refused at load with a 400 naming the problem; every other
tenant keeps getting the same tokens, and no refused name becomes a metric label."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from tests.e2e.conftest import make_adapters, make_checkpoint, server_config

WEIGHTS = "adapter_model.safetensors"
ROWS = [(None, [5, 6, 7, 8]), ("a", [9, 10, 11]), ("a", [300, 301]), (None, [40])]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("trust")
    base = make_checkpoint(root)
    good = make_adapters(base, root, ["qv_r4"])["qv_r4"]
    return base, good, root


def broken_copy(good: Path, out: Path, config: dict[str, Any], scale: float | None) -> Path:
    path = Path(shutil.copytree(good, out))
    raw = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**raw, **config}))
    if scale is not None:
        state = {k: v.clone() * scale for k, v in load_file(str(path / WEIGHTS)).items()}
        save_file(state, str(path / WEIGHTS))
    return path


async def generate_rows(client: Any) -> list[list[int]]:
    body = {
        "input_ids": [ids for _, ids in ROWS],
        "lora_path": [name for name, _ in ROWS],
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
    }
    resp = await client.post("/generate", json=body)
    assert resp.status == 200, await resp.text()
    return [out["output_ids"] for out in await resp.json()]


async def test_broken_adapters_are_refused_and_others_unaffected(
    paths: tuple[Path, Path, Path], lorasrv_client: Any
) -> None:
    base, good, root = paths
    client = await lorasrv_client(
        server_config(base, lora_paths=[f"a={good}"], enable_lora=True, max_loras_per_batch=3)
    )
    expected = await generate_rows(client)
    cases = [
        ("alpha", {"lora_alpha": 1e308}, None, "lora_alpha 1e+308 is not representable"),
        ("nan", {}, float("nan"), "NaN or infinite"),
        ("inf", {}, float("inf"), "NaN or infinite"),
        ("huge", {}, 1e7, "refused as corrupt"),
        ("zero", {"lora_alpha": 0}, None, "lora_alpha must not be 0"),
        ("rslora", {"use_rslora": "yes"}, None, "use_rslora must be true or false"),
        ("empty", {"target_modules": []}, None, "target_modules is empty"),
    ]
    for name, config, scale, needle in cases:
        path = broken_copy(good, root / name, config, scale)
        resp = await client.post(
            "/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
        )
        body = await resp.json()
        assert resp.status == 400, body
        assert needle in body["error_message"], body
        resp = await client.post("/generate", json={"input_ids": [5], "lora_path": name})
        assert resp.status == 404  # never registered
        assert await generate_rows(client) == expected
    for bad_name in ("n" * 257, "tab\tname", ""):
        resp = await client.post(
            "/load_lora_adapter", json={"lora_name": bad_name, "lora_path": str(good)}
        )
        body = await resp.json()
        assert resp.status == 400, body
        assert "adapter name" in body["error_message"]
    long_name = "x" * 100_000
    resp = await client.post("/generate", json={"input_ids": [5], "lora_path": long_name})
    assert resp.status == 404
    resp = await client.post(
        "/generate", json={"input_ids": list(range(1, 5000)), "lora_path": long_name}
    )
    assert resp.status in (400, 413)  # refused before its adapter was looked up
    metrics = await (await client.get("/metrics")).text()
    assert long_name[:300] not in metrics
    assert 'adapter="a"' in metrics
    assert await generate_rows(client) == expected
