"""The periodic stats log line of a serving process (`--log-stats-interval`, 10 s by default).

Reads only what the engine already publishes (its scheduler stats, metrics counters and adapter
statuses); `format_line` is pure, `log_stats` is the loop `serve_async` runs beside the app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import NamedTuple

from prometheus_client import Counter

from lorasrv.engine.engine import Engine
from lorasrv.engine.stats import SchedulerStats
from lorasrv.errors import LorasrvError
from lorasrv.messages import AdapterStatus

log = logging.getLogger("lorasrv.stats")


class Sample(NamedTuple):
    """Cumulative counts at one moment; two samples give the rates of a line."""

    at_s: float
    prompt_tokens: float
    generation_tokens: float
    evictions: int


def counter_total(counter: Counter) -> float:
    """The sum of a labelled counter over every label set."""
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def take_sample(engine: Engine, adapters: Iterable[AdapterStatus], at_s: float) -> Sample:
    metrics = engine.metrics
    return Sample(
        at_s=at_s,
        prompt_tokens=counter_total(metrics.prompt_tokens),
        generation_tokens=counter_total(metrics.generation_tokens),
        evictions=sum(status.num_evictions for status in adapters),
    )


def format_line(
    before: Sample, now: Sample, stats: SchedulerStats, adapters: tuple[AdapterStatus, ...]
) -> str:
    """`running: 3 reqs, waiting: 0 reqs, prompt: 812.0 tok/s, ...` over the interval."""
    span_s = max(now.at_s - before.at_s, 1e-9)
    prompt_rate = (now.prompt_tokens - before.prompt_tokens) / span_s
    generation_rate = (now.generation_tokens - before.generation_tokens) / span_s
    pages, used = stats.num_kv_pages, stats.num_kv_pages_used
    usage = 100.0 * used / pages if pages else 0.0
    resident = sum(status.slot is not None for status in adapters)
    return (
        f"running: {stats.num_running} reqs, waiting: {stats.num_waiting + stats.num_acquiring} "
        f"reqs, prompt: {prompt_rate:.1f} tok/s, generation: {generation_rate:.1f} tok/s, "
        f"KV cache: {usage:.1f}% ({used}/{pages} pages), adapters: {resident} resident / "
        f"{len(adapters)} registered, adapter swaps: {now.evictions - before.evictions}"
    )


def is_idle(before: Sample, now: Sample, stats: SchedulerStats) -> bool:
    busy = stats.num_running or stats.num_waiting or stats.num_acquiring
    return not busy and before[1:] == now[1:]


async def log_stats(engine: Engine, interval_s: float) -> None:
    """Log a line every `interval_s` until cancelled or the engine stops; of idle intervals in a
    row, only the first."""
    try:
        adapters = await engine.describe_adapters()
    except LorasrvError:  # the engine stopped; serve_async is ending too
        return
    before = take_sample(engine, adapters, time.monotonic())
    was_idle = False
    while True:
        await asyncio.sleep(interval_s)
        try:
            adapters = await engine.describe_adapters()
        except LorasrvError:
            return
        now = take_sample(engine, adapters, time.monotonic())
        stats = engine.last_stats
        idle = is_idle(before, now, stats)
        if not (idle and was_idle):
            log.info("%s", format_line(before, now, stats, adapters))
        before, was_idle = now, idle
