"""Nothing in the repo is importable under another distribution's name from the repo root.

`python -m pytest`, `python -c` and `python -m lorasrv` put the repo root first on `sys.path`, so a
regular package there named like an installed distribution wins over it. That happened once: a
`kernels/__init__.py` hid Hugging Face's `kernels`, which transformers 5 imports, and a fresh
install ran no test.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = frozenset({"lorasrv", "lorasrv_kernels"})
#: names that matter even where their distribution is not installed: what our dependencies import
#: (transformers imports `kernels` when present) and the usual top-level test and tool names.
KNOWN_FOREIGN = frozenset(
    {"kernels", "transformers", "peft", "torch", "triton", "tokenizers", "safetensors", "aiohttp"}
    | {"msgspec", "numpy", "huggingface_hub", "openai", "hypothesis", "pytest", "mypy", "ruff"}
)


def root_modules() -> dict[str, bool]:
    """Importable names at the repo root -> whether they are regular (can shadow) or namespace."""
    names: dict[str, bool] = {}
    for entry in REPO.iterdir():
        if entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = True
        elif entry.is_dir() and entry.name.isidentifier():
            names[entry.name] = (entry / "__init__.py").exists()
    return names


def test_no_root_package_shadows_a_distribution() -> None:
    installed = set(importlib.metadata.packages_distributions()) - OURS
    foreign = installed | KNOWN_FOREIGN
    names = root_modules()
    assert "kernels" in names  # the layout keeps the folder
    shadowing = sorted(name for name, regular in names.items() if regular and name in foreign)
    assert shadowing == []
    # A namespace folder cannot hide a regular package, but modules directly in it would join a
    # namespace distribution of the same name.
    for name, regular in names.items():
        if not regular and name in foreign:
            assert not list((REPO / name).glob("*.py")), name


def test_regular_packages_at_the_root_are_ours_or_tests() -> None:
    regular = {name for name, is_regular in root_modules().items() if is_regular}
    assert regular <= {"lorasrv", "tests"}


IMPORTS = """
import importlib.metadata, json, kernels, peft, transformers.integrations.hub_kernels as hub
print(json.dumps({"kernels": kernels.__file__, "paths": list(kernels.__path__)}))
"""


def hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("how", ["-c", "-m"])
def test_imports_from_the_repo_root_find_the_real_packages(how: str, tmp_path: Path) -> None:
    """`python -c` and `python -m` from the repo root: both put it first on sys.path."""
    if how == "-c":
        argv = [sys.executable, "-c", IMPORTS]
    else:
        (tmp_path / "probe_imports.py").write_text(IMPORTS)
        argv = [sys.executable, "-m", "probe_imports"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # not the repo: only the cwd puts it there
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if hf_kernels_installed():  # NOTE: the venv may live inside the repo (make's ./.venv)
        assert found["kernels"] is not None
        assert not Path(found["kernels"]).is_relative_to(REPO / "kernels"), found
        assert "site-packages" in Path(found["kernels"]).parts, found
    else:  # at most the empty namespace of our kernels/ folder, which holds no module
        assert found["kernels"] is None, found
        for path in found["paths"]:
            assert not list(Path(path).glob("*.py")), path
