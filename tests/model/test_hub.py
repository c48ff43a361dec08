"""hub.resolve_path against a hand-populated Hugging Face cache, offline (nothing is downloaded)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lorasrv.hub import resolve_path
from lorasrv.peft_config import AdapterLoadError, read_peft_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """The layout huggingface_hub writes: snapshots/<commit>/..., refs/main -> commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_local_directory_as_is(tmp_path: Path) -> None:
    assert resolve_path(str(tmp_path)) == str(tmp_path)


def test_cached_id_resolves_offline(offline_cache: Path) -> None:
    snapshot = populate(offline_cache, "org/tiny-llama", {"config.json": "{}"})
    assert Path(resolve_path("org/tiny-llama")) == snapshot
    assert Path(resolve_path("org/tiny-llama", revision=COMMIT)) == snapshot
    assert Path(resolve_path("org/tiny-llama", allow_patterns=["*.json"])) == snapshot


def test_hf_home_is_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = populate(tmp_path / "hub", "org/other", {"config.json": "{}"})
    assert Path(resolve_path("org/other")) == snapshot


def test_unknown_id_offline_names_it(offline_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'org/missing'.*HF_HUB_OFFLINE=1"):
        resolve_path("org/missing")
    populate(offline_cache, "org/present", {"config.json": "{}"})
    with pytest.raises(FileNotFoundError, match="revision 'v2'"):
        resolve_path("org/present", revision="v2")


def test_missing_paths_and_invalid_ids(offline_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        resolve_path("/definitely/not/here")
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        resolve_path("./relative/missing")
    with pytest.raises(FileNotFoundError, match="not a valid Hugging Face Hub id"):
        resolve_path("bad id with spaces")


def test_adapter_from_the_cache(
    offline_cache: Path, adapter_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    source = adapter_dir("qv_r4")
    files = {p.name: p.read_text() for p in source.iterdir() if p.suffix == ".json"}
    snapshot = populate(offline_cache, "org/qv-adapter", files)
    shutil.copy(source / "adapter_model.safetensors", snapshot)
    config = read_peft_config("org/qv-adapter")
    assert Path(config.path) == snapshot
    assert config.target_modules == ("q_proj", "v_proj")
    with pytest.raises(AdapterLoadError, match="org/nope"):
        read_peft_config("org/nope")
    assert json.loads(files["adapter_config.json"])["r"] == 4
