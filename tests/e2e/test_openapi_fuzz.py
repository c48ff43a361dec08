"""A bounded schemathesis pass against a live demo server (`python -m lorasrv`), driven by its own
`/openapi.json`: no 5xx, and every answer fits the document (status, content type, schema).

Bounded for CI (about a minute on 2 cores): a short context, few examples per operation.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("LORASRV_FUZZ_EXAMPLES", "25"))
START_TIMEOUT_S = 300  # a fresh machine builds the demo model first


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'kernels'}",
    }
    args = [sys.executable, "-m", "lorasrv", "--port", str(port), "--context-length", "64",
            "--max-running-requests", "16", "--log-level", "warning",
            "--log-stats-interval", "0"]  # fmt: skip
    server = subprocess.Popen(args, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert server.poll() is None, "the demo server exited"
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass  # the port is bound before the model loads: connections wait
            assert time.monotonic() < deadline, "the demo server did not come up"
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def fuzz_operation(operation: Any) -> str | None:
    """EXAMPLES generated requests against one operation; the first failure, if any."""

    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same requests every run: a failure reproduces
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: Any) -> None:
        case.call_and_validate(checks=CHECKS, timeout=60)

    try:
        run()
    except Exception as exc:  # schemathesis' failure groups, or a transport error
        return f"{operation.method.upper()} {operation.path}: {str(exc)[:2000]}"
    return None


def test_api_answers_fit_the_document(demo_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{demo_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 19
    failures = [f for f in map(fuzz_operation, operations) if f is not None]
    assert not failures, "\n\n".join(failures)
    assert requests.get(f"{demo_url}/health", timeout=10).status_code == 200  # still serving


def test_the_document_is_openapi_3_1(demo_url: str) -> None:
    document = requests.get(f"{demo_url}/openapi.json", timeout=10).json()
    assert document["openapi"] == "3.1.0"
    assert {"/generate", "/v1/completions", "/v1/chat/completions", "/load_lora_adapter"} <= set(
        document["paths"]
    )
    request = document["paths"]["/generate"]["post"]["requestBody"]
    assert request["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateRequest")
