"""What can be checked of the install without a registry or Docker: the runtime wheel carries every
module and no dev tool, and the Dockerfile copies what that install reads, torch first."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEV_TOOLS = ("transformers", "peft", "pytest", "hypothesis", "mypy", "ruff", "openai")


def dockerfile_copies() -> list[str]:
    sources: list[str] = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *paths, _ = line.split()[1:]
            sources += paths
    return sources


@pytest.fixture(scope="module")
def docker_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from only what the Dockerfile copies, as its `pip install .` would."""
    context = tmp_path_factory.mktemp("context")
    for source in dockerfile_copies():
        path = REPO / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, context / source)
    out = tmp_path_factory.mktemp("wheel")
    build = f"import setuptools.build_meta as b; print(b.build_wheel({str(out)!r}))"
    subprocess.run(
        [sys.executable, "-c", build], cwd=context, check=True, capture_output=True, timeout=300
    )
    (wheel,) = out.glob("lorasrv-*.whl")
    return wheel


def test_the_docker_context_builds_every_module(docker_wheel: Path) -> None:
    names = set(zipfile.ZipFile(docker_wheel).namelist())
    expected = {str(p.relative_to(REPO)) for p in (REPO / "lorasrv").rglob("*.py")}
    kernels = REPO / "kernels"
    expected |= {str(p.relative_to(kernels)) for p in (kernels / "lorasrv_kernels").rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    assert {"lorasrv/py.typed", "lorasrv_kernels/py.typed"} <= names


def test_runtime_requirements_hold_no_dev_tool(docker_wheel: Path) -> None:
    with zipfile.ZipFile(docker_wheel) as wheel:
        meta_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(wheel.read(meta_name).decode())
    runtime = [req for req in metadata.get_all("Requires-Dist") or [] if "extra ==" not in req]
    names = {re.split(r"[<>=!~; \[]", req, maxsplit=1)[0].lower() for req in runtime}
    assert {"torch", "aiohttp", "msgspec", "tokenizers", "safetensors", "triton"} <= names
    assert not names & set(DEV_TOOLS), names
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Version"] == __import__("lorasrv").__version__


def test_dockerfile_installs_cuda_torch_first_then_the_runtime() -> None:
    text = (REPO / "Dockerfile").read_text()
    torch_at = text.index('pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"')
    assert "download.pytorch.org/whl/cu" in text
    assert torch_at < text.index("RUN pip install . ")
    assert "[dev]" not in text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {"pyproject.toml", project["readme"], *project["license-files"], "lorasrv", "kernels"}
    assert needed <= set(dockerfile_copies())
    entry = re.search(r"^ENTRYPOINT (.*)$", text, re.MULTILINE)
    assert entry is not None
    assert entry[1] == '["lorasrv", "--host", "0.0.0.0", "--port", "30000"]'
    # nothing the image copies may be excluded from the build context
    ignored = (REPO / ".dockerignore").read_text().split()
    assert not set(dockerfile_copies()) & set(ignored)
