"""End-to-end helpers: a real lorasrv server on loopback over a tiny random checkpoint (with the
demo tokenizer), and greedy references computed with HF transformers and PEFT."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from lorasrv.config import build_config
from lorasrv.demo import ensure_demo_model
from lorasrv.engine.engine import Engine
from lorasrv.http.app import build_app
from tests.model.checkpoints import ADAPTERS, build_adapter, build_checkpoint

VOCAB = 1024  # the demo tokenizer's size, so text prompts work too
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_checkpoint(root: Path, kind: str = "llama", **overrides: Any) -> Path:
    out = build_checkpoint(root / kind, kind, vocab_size=VOCAB, **overrides)
    demo = Path(ensure_demo_model(root / "demo-cache").model_path)
    for name in TOKENIZER_FILES:
        shutil.copy(demo / name, out / name)
    return out


def make_adapters(base: Path, root: Path, names: Sequence[str]) -> dict[str, Path]:
    return {name: build_adapter(base, root / name, **ADAPTERS[name]) for name in names}


@torch.no_grad()
def greedy(model: Any, prompt: Sequence[int], num_new: int) -> list[int]:
    """Reference greedy decoding: full forward each step (tiny model), eos ignored."""
    ids = torch.tensor([list(prompt)])
    out: list[int] = []
    for _ in range(num_new):
        token = int(model(ids).logits[0, -1].float().argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def reference_models(base: Path, adapters: dict[str, Path], kind: str = "llama") -> dict[Any, Any]:
    """name -> HF model (None = base), each a fresh copy with only that adapter applied."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models: dict[Any, Any] = {None: AutoModelForCausalLM.from_pretrained(base).eval()}
    for name, path in adapters.items():
        plain = AutoModelForCausalLM.from_pretrained(base)
        models[name] = PeftModel.from_pretrained(plain, path).eval()
    return models


def server_config(model_path: Path, **flat: Any) -> Any:
    options: dict[str, Any] = {
        "model_path": str(model_path),
        "device": "cpu",
        "dtype": "float32",
        "page_size": 4,
        "num_kv_pages": 256,
        "chunked_prefill_size": 24,  # small, so long prompts prefill in chunks
        "port": 0,
    }
    options.update(flat)
    return build_config(options)


ClientFactory = Callable[..., Any]


@pytest.fixture
async def lorasrv_client() -> AsyncIterator[Callable[..., Any]]:
    """`client = await lorasrv_client(config)`: a real server on 127.0.0.1 and an aiohttp client."""
    clients: list[TestClient[Any, Any]] = []

    async def start(config: Any) -> TestClient[Any, Any]:
        app: web.Application = build_app(config, Engine(config), manage_engine=True)
        server = TestServer(app, host="127.0.0.1")  # runs with handler_cancellation=True
        client: TestClient[Any, Any] = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()
    await asyncio.sleep(0)


PROMPTS = [
    [11, 400, 23, 7],
    [5, 9, 200, 77, 31, 8, 120, 64, 3, 99, 15, 42, 600, 17, 250, 12, 90, 33, 71, 5, 8, 910,
     27, 44, 300, 18, 63, 2, 81],  # longer than one prefill chunk
    [700],
    [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
]  # fmt: skip
