"""TP test fixtures: a tiny checkpoint with the demo tokenizer and three PEFT adapters of
different ranks and targets, built once per session (CPU, no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorasrv.config import build_config
from tests.e2e.conftest import make_adapters, make_checkpoint

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
