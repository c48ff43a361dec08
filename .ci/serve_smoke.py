"""CI: the runtime install (`pip install .`) serves the demo model without the dev toolchain.

Run with the runtime venv's python from outside the repo (so only the installed package is found).
Stdlib only: starts `python -m lorasrv`, generates with a demo adapter, stops it with SIGTERM.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

DEV_ONLY = ("transformers", "peft", "mypy", "ruff", "hypothesis", "pytest", "openai")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(url: str, body: dict[str, object] | None = None) -> dict[str, object]:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(url, data=data, timeout=60) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def wait_healthy(url: str, server: subprocess.Popen[bytes], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"serve_smoke: the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"serve_smoke: not healthy after {limit_s} s")


def main() -> None:
    present = [name for name in DEV_ONLY if importlib.util.find_spec(name) is not None]
    assert not present, f"the runtime install pulled dev tools: {present}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "lorasrv", "--port", str(port)])
    try:
        wait_healthy(url, server, limit_s=600)
        version = call(url + "/version")
        assert version["version"] == importlib.metadata.version("lorasrv"), version
        params = {"max_new_tokens": 8, "temperature": 0}
        out = call(
            url + "/generate",
            {"text": "Hello", "lora_path": "demo-lora-a", "sampling_params": params},
        )
        assert out["meta_info"]["completion_tokens"] == 8, out  # type: ignore[index]
        print(f"serve_smoke: ok, {version}, demo-lora-a says {out['text']!r}")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    assert code == 0, f"exit status {code} after SIGTERM"


if __name__ == "__main__":
    main()
