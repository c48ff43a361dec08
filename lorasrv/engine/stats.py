"""Snapshots that actors publish for /metrics and /get_server_info; the Engine keeps the latest."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from lorasrv.ids import AdapterId


class GpuAdapter(NamedTuple):
    """One adapter version resident on the GPU, as the scheduler's planner has it."""

    adapter_id: AdapterId
    num_rows: int
    num_evictions: int


class SchedulerStats(NamedTuple):
    num_running: int = 0
    num_waiting: int = 0
    num_acquiring: int = 0
    num_kv_pages: int = 0  # the arena, in KV pages (adapter rows take some of them)
    num_kv_pages_used: int = 0  # held by requests (cached pages no request holds are free)
    num_cached_pages: int = 0  # in the prefix cache, held by requests or not
    num_cached_pages_evicted: int = 0  # unused cached pages given back to KV or adapter rows
    num_lora_rows: int = 0  # rows adapters may hold when KV leaves them room
    num_lora_rows_used: int = 0
    lora_capacity: int = 0  # distinct adapters a batch may hold (effective max_loras_per_batch)
    gpu_adapters: tuple[GpuAdapter, ...] = ()
    last_step_s: float = 0.0
    last_step_tokens: int = 0
    num_steps: int = 0
    num_finished: int = 0  # requests that left the scheduler, however they ended
    num_aborted: int = 0  # of which aborted (client gone, stop string, explicit abort)
    # The overlap schedule: steps sent while another was still in flight (planned without its
    # tokens), and sampled tokens dropped because their row had finished meanwhile.
    num_steps_overlapped: int = 0
    num_tokens_dropped: int = 0


class StatsSink(Protocol):
    def scheduler_stats(self, stats: SchedulerStats) -> None: ...
