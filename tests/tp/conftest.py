"""TP test fixtures, built once per session (CPU, no downloads): a tiny checkpoint with the demo
tokenizer and three PEFT adapters of different ranks and targets (engine tests), and an "odd"
checkpoint that exercises the corners of the sharding with one adapter (runner tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorasrv.config import build_config
from tests.e2e.conftest import make_adapters, make_checkpoint
from tests.model.checkpoints import ADAPTERS, build_adapter, build_checkpoint

ADAPTER_NAMES = ("qv_r4", "all_r8_rslora", "mlp_r16_patterns")


@pytest.fixture(scope="session")
def tp_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tp")
    base = make_checkpoint(root)
    return {"base": base, "adapters": make_adapters(base, root, ADAPTER_NAMES)}


def tp_config(base: Path, tp_size: int, **flat: Any) -> Any:
    """float32 on CPU (gloo between ranks), small pages so block tables span several pages."""
    options: dict[str, Any] = {
        "model_path": str(base),
        "device": "cpu",
        "dtype": "float32",
        "tp_size": tp_size,
        "page_size": 4,
        "num_kv_pages": 128,
        "chunked_prefill_size": 24,
        "port": 0,
    }
    options.update(flat)
    return build_config(options)


ODD = {
    "num_key_value_heads": 1,  # < tp_size: each rank holds a copy of the KV head
    "vocab_size": 255,  # odd: the second vocab shard is padded
    "attention_bias": True,  # q/k/v bias (column-parallel), o bias (rank 0 only)
    "tie_word_embeddings": True,  # the LM head is the vocab-parallel embedding
}
PROMPTS = [[5, 9, 20, 7], [11, 40, 23, 7, 99, 100, 3], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
ROW_ADAPTERS = [None, 1, None, 1]


@pytest.fixture(scope="session")
def odd_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tp-odd")
    base = build_checkpoint(root / "base", "llama", **ODD)
    adapters = {name: build_adapter(base, root / name, **ADAPTERS[name]) for name in ADAPTER_NAMES}
    return {"base": base, "adapter": adapters["all_r8_rslora"], "adapters": adapters}


def runner_options(base: Path) -> dict[str, Any]:
    return {
        "model_path": str(base),
        "dtype": "float32",
        "device": "cpu",
        "page_size": 4,
        "num_kv_pages": 256,  # the arena holds the adapter rows too
        "enable_lora": True,
        "lora_max_rank": 16,
        "lora_target_modules": ("all",),
        "lora_backend": "torch",
    }
