"""`python -m lorasrv` fails early and in one line: a taken port before anything loads, a missing
model folder, a bad adapter path; each path named once; a traceback only at --log-level debug."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorasrv.demo import DemoModel, ensure_demo_model

MISSING_MODEL = "/nonexistent/lorasrv-model"
MISSING_ADAPTER = "/nonexistent/lorasrv-adapter"


def lorasrv(*args: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "lorasrv", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return done.returncode, done.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    return ensure_demo_model(tmp_path_factory.mktemp("cache"))


def test_a_taken_port_fails_before_the_model_is_looked_at() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        code, err = lorasrv("--port", str(port), "--model-path", MISSING_MODEL)
    assert code == 2
    assert err == [
        f"lorasrv: error: cannot listen on 127.0.0.1:{port}: "
        "address already in use (another server? pick one with --port)"
    ]
    assert time.monotonic() - start < 30  # no model load, not even torch's import


def test_missing_model_folder_is_one_line_naming_it_once() -> None:
    code, err = lorasrv("--port", "0", "--model-path", MISSING_MODEL, "--log-level", "warning")
    assert code == 2
    assert err == [f"lorasrv: error: --model-path: {MISSING_MODEL!r}: no such local directory"]


@pytest.mark.parametrize("kind", ["missing", "not_peft"])
def test_bad_adapter_path_is_one_line_naming_it_once(
    demo: DemoModel, tmp_path: Path, kind: str
) -> None:
    path = MISSING_ADAPTER if kind == "missing" else str(tmp_path)  # a folder, no adapter config
    code, err = lorasrv(
        "--port", "0", "--model-path", demo.model_path, "--lora-paths", f"a={path}",
        "--log-level", "warning",
    )  # fmt: skip
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("lorasrv: error: --lora-paths a: adapter "), err
    assert err[0].count(path) == 1, err
    assert "Traceback" not in err[0]


def test_debug_adds_the_traceback() -> None:
    code, err = lorasrv("--port", "0", "--model-path", MISSING_MODEL, "--log-level", "debug")
    assert code == 2
    assert "Traceback (most recent call last):" in err
    assert err[-1] == f"lorasrv: error: --model-path: {MISSING_MODEL!r}: no such local directory"
