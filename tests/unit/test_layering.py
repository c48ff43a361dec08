"""The import edges HOUSE_STYLE draws, checked with ast so a shortcut cannot creep in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE_ENGINE = {
    "adapter_catalog", "adapter_registry", "adapter_status", "admission", "arena", "arena_geometry",
    "batch_adapters", "host_cache", "invariants", "lora_spec", "outputs", "planner", "policy",
    "prefix_cache", "prefix_pages", "requests", "residency", "results", "sequence", "stats",
    "step_plan", "step_runner", "validation",
}  # fmt: skip
PURE_ALLOWED = {"lorasrv.ids", "lorasrv.config", "lorasrv.messages", "lorasrv.errors", "msgspec"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("name", sorted(PURE_ENGINE))
def test_pure_engine_modules_import_no_asyncio_or_torch(name: str) -> None:
    path = ROOT / "lorasrv" / "engine" / f"{name}.py"
    if not path.exists():
        pytest.fail(f"{path} listed as pure but missing")
    for module in imports_of(path):
        top = module.split(".")[0]
        if top != "lorasrv" and module not in PURE_ALLOWED:
            import sys

            assert module in sys.stdlib_module_names or top in sys.stdlib_module_names, module
            assert top not in {"asyncio", "torch", "triton"}, f"{name} imports {module}"
        elif top == "lorasrv":
            pure_sibling = module.startswith("lorasrv.engine.") and module.split(".")[2] in (
                PURE_ENGINE
            )
            assert module in PURE_ALLOWED or pure_sibling, f"{name} imports {module}"


def test_only_gpu_runner_imports_the_model() -> None:
    """`lorasrv.tp` (tensor-parallel workers) counts as part of the model."""
    for path in files("lorasrv"):
        if path.parent.name in ("model", "tp") or path.name == "demo.py":
            continue
        uses_model = any(m.startswith(("lorasrv.model", "lorasrv.tp")) for m in imports_of(path))
        if uses_model:
            assert path.relative_to(ROOT).as_posix() == "lorasrv/engine/gpu_runner.py", path


def test_model_imports_neither_asyncio_nor_the_engine() -> None:
    for path in [*files("lorasrv/model"), *files("lorasrv/tp")]:
        for module in imports_of(path):
            assert module != "asyncio", path
            engine_ok = module == "lorasrv.engine.step_runner"
            assert engine_ok or not module.startswith("lorasrv.engine"), f"{path}: {module}"


def test_model_never_imports_tp() -> None:
    """The dependency runs one way: tp workers build the model, the model knows no processes."""
    for path in files("lorasrv/model"):
        assert not any(m.startswith("lorasrv.tp") for m in imports_of(path)), path


def test_http_never_imports_torch_or_the_model() -> None:
    for path in files("lorasrv/http"):
        for module in imports_of(path):
            assert module.split(".")[0] not in {"torch", "triton"}, f"{path}: {module}"
            assert not module.startswith(("lorasrv.model", "lorasrv.tp")), f"{path}: {module}"


def test_kernels_never_import_lorasrv() -> None:
    for path in files("kernels"):
        for module in imports_of(path):
            assert not module.startswith("lorasrv"), f"{path}: {module}"
