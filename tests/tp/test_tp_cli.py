"""`python -m lorasrv --tp-size 2` on CPU: killing a worker ends the server with a non-zero exit
status and the cause on stderr, and leaves no worker behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

STARTUP_TIMEOUT_S = 90
EXIT_TIMEOUT_S = 20


class StderrLines:
    """Collects a child's stderr lines on a thread, so waits can be bounded."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stderr is not None
        self._stream = process.stderr
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout_s}s:\n{self.text}")

    def wait_closed(self, timeout_s: float) -> None:
        """Until the stream ends (every process holding it has exited): no line is left out."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "stderr is still open: some process outlived it"

    @property
    def text(self) -> str:
        return "".join(self.lines)


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie still answers kill(pid, 0))."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def test_server_exits_nonzero_when_a_worker_is_killed(tp_world: dict[str, Any]) -> None:
    command = [
        sys.executable, "-m", "lorasrv", "--model-path", str(tp_world["base"]),
        "--tp-size", "2", "--device", "cpu", "--dtype", "float32",
        "--host", "127.0.0.1", "--port", "0", "--num-kv-pages", "64", "--page-size", "4",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stderr = StderrLines(process)
    try:
        pids = {
            rank: int(stderr.wait_for(rf"tp worker {rank} started: pid (\d+)", 30)[1])
            for rank in (0, 1)
        }
        stderr.wait_for(r"serving on http://", STARTUP_TIMEOUT_S)
        os.kill(pids[1], signal.SIGKILL)
        status = process.wait(timeout=EXIT_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    stderr.wait_closed(EXIT_TIMEOUT_S)
    assert status != 0, stderr.text
    assert re.search(r"tp worker 1 \(pid \d+\) was killed by SIGKILL", stderr.text), stderr.text
    assert not is_running(pids[0]), "worker 0 outlived the server"
