"""WorkerMonitor: the one place that decides a TP worker has failed, from a thread of its own.

A worker that exits, stops beating its heartbeat, or leaves an operation past its deadline is
a failure: every worker is killed (so no collective waits forever and nothing is left behind)
and the listeners (the GPU runner actor) are told the cause. Never talks to the workers.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

from lorasrv.errors import EngineDead

logger = logging.getLogger(__name__)

POLL_S = 0.2


class TpWorkerError(EngineDead):
    """A tensor-parallel worker died, hung, or the coordinator lost contact with it: the engine
    cannot run (the CLI prints it and exits 1 when it happens at startup)."""


class WorkerMonitor:
    def __init__(
        self,
        processes: Sequence[BaseProcess],
        heartbeats: Sequence[Any],  # multiprocessing Values the workers increment
        *,
        heartbeat_timeout_s: float,
        read_error: Callable[[int], str | None],
    ) -> None:
        self._processes = list(processes)
        self._heartbeats = list(heartbeats)
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._read_error = read_error
        self._lock = threading.Lock()
        self._failed = threading.Event()
        self._stopped = threading.Event()
        self._listeners: list[Callable[[str], None]] = []
        self._deadline: tuple[str, float] | None = None
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="lorasrv-tp-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """From now on workers may exit (shutdown); no failure is reported."""
        self._stopped.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * POLL_S + 1)

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """`listener(cause)` once, from the monitor thread (at once if already failed)."""
        with self._lock:
            if self.failure is None:
                self._listeners.append(listener)
                return
            cause = self.failure
        listener(cause)

    def wait_failure(self, timeout_s: float) -> str | None:
        self._failed.wait(timeout_s)
        return self.failure

    @contextlib.contextmanager
    def deadline(self, what: str, timeout_s: float) -> Iterator[None]:
        """The coordinator is waiting on the workers for `what`; past timeout_s it is a hang."""
        self._deadline = (what, time.monotonic() + timeout_s)
        try:
            yield
        finally:
            self._deadline = None

    def fail(self, cause: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = cause
            listeners, self._listeners = self._listeners, []
        logger.error("tensor parallel failure: %s; stopping every worker", cause)
        for process in self._processes:
            if process.is_alive():
                process.kill()
        self._failed.set()
        for listener in listeners:
            try:
                listener(cause)
            except Exception:
                logger.exception("tp failure listener raised")

    def _run(self) -> None:
        beats = [int(h.value) for h in self._heartbeats]
        seen = [time.monotonic()] * len(beats)
        sentinels = [p.sentinel for p in self._processes]
        while not self._stopped.is_set() and self.failure is None:
            wait(sentinels, timeout=POLL_S)
            if self._stopped.is_set():
                return
            now = time.monotonic()
            for rank, process in enumerate(self._processes):
                if process.exitcode is not None:
                    self.fail(self._describe_exit(rank, process))
                    return
                beat = int(self._heartbeats[rank].value)
                # Before its first beat a worker is still importing; the startup deadline counts.
                if beat != beats[rank] or beat == 0:
                    beats[rank], seen[rank] = beat, now
                elif now - seen[rank] > self._heartbeat_timeout_s:
                    self.fail(
                        f"tp worker {rank} (pid {process.pid}) is unresponsive: no heartbeat "
                        f"for {now - seen[rank]:.1f}s"
                    )
                    return
            deadline = self._deadline
            if deadline is not None and now > deadline[1]:
                self.fail(f"tp workers did not finish {deadline[0]} in time (hung?)")
                return

    def _describe_exit(self, rank: int, process: BaseProcess) -> str:
        code = process.exitcode
        assert code is not None
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        cause = f"tp worker {rank} (pid {process.pid}) {how}"
        error = self._read_error(rank)
        return f"{cause}: {error}" if error else cause


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
