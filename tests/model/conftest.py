"""Model-test fixtures: tiny checkpoints and adapters built once per session under a tmp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model.checkpoints import ADAPTERS, build_adapter, build_checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> object:
    """`checkpoint_dir(kind)` -> folder of a tiny checkpoint of that kind, built on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(kind: str = "llama") -> Path:
        if kind not in built:
            built[kind] = build_checkpoint(root / kind, kind)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, checkpoint_dir: object) -> object:
    """`adapter_dir(name, kind="llama")` -> folder of the named adapter (see ADAPTERS)."""
    root = tmp_path_factory.mktemp("adapters")
    built: dict[tuple[str, str], Path] = {}

    def get(name: str, kind: str = "llama") -> Path:
        if (name, kind) not in built:
            base = checkpoint_dir(kind)  # type: ignore[operator]
            built[name, kind] = build_adapter(base, root / f"{kind}-{name}", **ADAPTERS[name])
        return built[name, kind]

    return get
