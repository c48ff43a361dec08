"""Snapshots that actors publish for /metrics and /get_server_info; the Engine keeps the latest."""

from __future__ import annotations

from typing import NamedTuple, Protocol


class SchedulerStats(NamedTuple):
    num_running: int = 0
    num_waiting: int = 0
    num_acquiring: int = 0
    num_kv_pages: int = 0
    num_kv_pages_used: int = 0
    last_step_s: float = 0.0
    last_step_tokens: int = 0
    num_steps: int = 0
    num_finished: int = 0  # requests that left the scheduler, however they ended
    num_aborted: int = 0  # of which aborted (client gone, stop string, explicit abort)


class StatsSink(Protocol):
    def scheduler_stats(self, stats: SchedulerStats) -> None: ...
