"""Prometheus metrics: one registry per Engine (never the global one), request instruments fed by
`RequestTracker` as outputs are consumed, and gauges read from a snapshot at scrape time.

Imports neither asyncio nor the engine: the Engine calls in, `/metrics` renders.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lorasrv.messages import AdapterStatus, RequestOutput

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
BASE_LABEL: Final = ""  # the `adapter` label of base-model requests
UNKNOWN_LABEL: Final = "<unknown>"  # requests that named no registered adapter
#: An adapter's state label (AdapterStatus.state, from its three owners' views).
ADAPTER_STATES: Final = ("loading", "cpu_loaded", "gpu_resident", "unloaded")
DRAINING_STATE: Final = "unloading"  # an unloaded version still draining its requests
TTFT_BUCKETS_S: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
ITL_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
E2E_BUCKETS_S: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineSnapshot(NamedTuple):
    """What the scrape-time collector reports: scheduler counts and adapter states."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_pages: int = 0
    num_kv_pages_used: int = 0
    num_cached_pages: int = 0
    num_lora_rows: int = 0
    num_lora_rows_used: int = 0
    lora_capacity: int = 0
    is_healthy: bool = True
    adapters: tuple[AdapterStatus, ...] = ()


class Metrics:
    """Request counters and latency histograms, plus scrape-time gauges, in a private registry."""

    def __init__(self, *, prefix_cache: bool = True) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.prefix_cache = prefix_cache  # queried tokens count only while the cache is on
        self.requests = Counter(
            "lorasrv_requests", "Finished requests by adapter and finish reason "
            "(stop, length, abort, error).", ["adapter", "finish_reason"], registry=reg,
        )  # fmt: skip
        self.request_errors = Counter(
            "lorasrv_request_errors", "Failed requests by error code.", ["code"], registry=reg
        )
        self.prompt_tokens = Counter(
            "lorasrv_prompt_tokens", "Prompt tokens of requests.", ["adapter"], registry=reg
        )
        self.generation_tokens = Counter(
            "lorasrv_generation_tokens", "Generated tokens.", ["adapter"], registry=reg
        )
        self.cache_query_tokens = Counter(
            "lorasrv_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache.",
            ["adapter"], registry=reg,
        )  # fmt: skip
        self.cache_hit_tokens = Counter(
            "lorasrv_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache "
            "(not computed).", ["adapter"], registry=reg,
        )  # fmt: skip
        self.ttft = Histogram(
            "lorasrv_time_to_first_token_seconds", "Submit to first generated token.",
            ["adapter"], buckets=TTFT_BUCKETS_S, registry=reg,
        )  # fmt: skip
        self.itl = Histogram(
            "lorasrv_inter_token_latency_seconds", "Time between generated tokens.",
            buckets=ITL_BUCKETS_S, registry=reg,
        )  # fmt: skip
        self.e2e = Histogram(
            "lorasrv_e2e_request_latency_seconds", "Submit to last output of finished requests.",
            buckets=E2E_BUCKETS_S, registry=reg,
        )  # fmt: skip
        self.http_requests = Counter(
            "lorasrv_http_requests", "HTTP requests by route and status.",
            ["method", "route", "status"], registry=reg,
        )  # fmt: skip
        self._snapshot = EngineSnapshot()
        reg.register(_SnapshotCollector(self))

    def track(self, request_id: str, lora_name: str | None) -> RequestTracker:
        """A tracker for one submitted request; its clock starts now."""
        return RequestTracker(self, request_id, lora_name, time.monotonic())

    def render(self, snapshot: EngineSnapshot) -> bytes:
        """The Prometheus text exposition, with `snapshot` as the scrape-time gauges."""
        self._snapshot = snapshot  # NOTE: read by the collector within this same call
        return generate_latest(self.registry)

    @property
    def snapshot(self) -> EngineSnapshot:
        return self._snapshot


@dataclass(slots=True)
class RequestTracker:
    """Observes one request's outputs as they are consumed; every method is cheap and sync."""

    metrics: Metrics
    request_id: str
    lora_name: str | None
    submitted_s: float
    last_token_s: float | None = None
    num_tokens: int = 0
    has_prompt: bool = False
    is_done: bool = False
    served: bool = False  # a token was generated: the adapter was registered

    @property
    def label(self) -> str:
        if self.lora_name is None:
            return BASE_LABEL
        # NOTE: client-chosen names must not mint label series: a name is a label only once a
        # token was generated with it (so it was registered), else it counts as unknown.
        return self.lora_name if self.served else UNKNOWN_LABEL

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        metrics = self.metrics
        self.served = self.served or bool(out.token_ids)
        if out.error_code is not None:
            self._finish("error", now, error_code=out.error_code)
            return
        if out.prompt_tokens and not self.has_prompt:
            self.has_prompt = True
            metrics.prompt_tokens.labels(self.label).inc(out.prompt_tokens)
            if metrics.prefix_cache:
                metrics.cache_query_tokens.labels(self.label).inc(out.prompt_tokens)
                metrics.cache_hit_tokens.labels(self.label).inc(out.cached_tokens)
        num_new = len(out.token_ids)
        if num_new:
            if self.last_token_s is None:
                metrics.ttft.labels(self.label).observe(now - self.submitted_s)
                gaps = num_new - 1  # the rest of a multi-token first delta came at once
            else:
                gaps = num_new
            step_s = (now - (self.last_token_s or now)) / max(gaps, 1)
            for _ in range(gaps):
                metrics.itl.observe(step_s)
            self.last_token_s = now
            self.num_tokens += num_new
            metrics.generation_tokens.labels(self.label).inc(num_new)
        if out.finished:
            self._finish(out.finish_reason or "stop", now)

    def aborted(self) -> None:
        """The consumer gave up before the end (client gone, error elsewhere, cancel)."""
        self._finish("abort", time.monotonic())

    def _finish(self, reason: str, now: float, error_code: str | None = None) -> None:
        if self.is_done:
            return
        self.is_done = True
        label = self.label
        if error_code is not None:
            self.metrics.request_errors.labels(error_code).inc()
        self.metrics.requests.labels(label, reason).inc()
        if error_code is None and reason != "abort":
            self.metrics.e2e.observe(now - self.submitted_s)
        log.debug(
            "request %s finished: %s%s, adapter=%s, %d tokens in %.3f s",
            self.request_id, reason, f" ({error_code})" if error_code else "", label or "-",
            self.num_tokens, now - self.submitted_s,
        )  # fmt: skip


class _SnapshotCollector(Collector):
    """Gauges (and adapter counters kept by the adapter manager) from the latest snapshot."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        snap = self._metrics.snapshot
        yield _gauge("lorasrv_engine_healthy", "1 while the engine runs.", float(snap.is_healthy))
        yield _gauge("lorasrv_num_running_requests", "Rows in the running batch.", snap.num_running)
        yield _gauge(
            "lorasrv_num_waiting_requests", "Requests queued for admission.", snap.num_waiting
        )
        yield _gauge("lorasrv_kv_pages", "KV cache pages in the pool.", snap.num_kv_pages)
        yield _gauge(
            "lorasrv_kv_pages_used", "KV cache pages held by requests.", snap.num_kv_pages_used
        )
        yield _gauge(
            "lorasrv_prefix_cache_pages", "KV pages in the prefix cache (used by requests or "
            "not; those not used are given back on demand).", snap.num_cached_pages,
        )  # fmt: skip
        usage = snap.num_kv_pages_used / snap.num_kv_pages if snap.num_kv_pages else 0.0
        yield _gauge("lorasrv_kv_page_usage_ratio", "Used / total KV pages (0..1).", usage)
        yield _gauge(
            "lorasrv_lora_rows", "LoRA rows adapters may hold (one per rank).", snap.num_lora_rows
        )
        yield _gauge("lorasrv_lora_rows_used", "LoRA rows adapters hold.", snap.num_lora_rows_used)
        yield _gauge(
            "lorasrv_max_loras_per_batch",
            "Distinct adapters a batch may hold: --max-loras-per-batch, or what memory allows.",
            snap.lora_capacity,
        )
        yield from _adapter_families(snap.adapters)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _adapter_families(adapters: Sequence[AdapterStatus]) -> Iterator[Metric]:
    label = ["adapter"]
    state = GaugeMetricFamily(
        "lorasrv_adapter_state", "1 for the adapter's current state.", labels=["adapter", "state"]
    )
    resident = GaugeMetricFamily(
        "lorasrv_adapter_gpu_resident", "1 while the adapter holds GPU rows.", labels=label
    )
    rows = GaugeMetricFamily(
        "lorasrv_adapter_gpu_rows", "LoRA rows the adapter holds on the GPU.", labels=label
    )
    pinned = GaugeMetricFamily("lorasrv_adapter_pinned", "1 if pinned.", labels=label)
    refs = GaugeMetricFamily("lorasrv_adapter_refs", "Requests holding the adapter.", labels=label)
    loads = CounterMetricFamily(
        "lorasrv_adapter_loads", "Loads from disk into host memory.", labels=label
    )
    evictions = CounterMetricFamily(
        "lorasrv_adapter_evictions", "Evictions from GPU rows or host memory.", labels=label
    )
    load_s = GaugeMetricFamily(
        "lorasrv_adapter_last_load_seconds", "Seconds the latest host load took.", labels=label
    )
    # NOTE: an unloaded version still draining its requests keeps its name until it is gone; a
    # reload under the same name would then give two series with one label, so skip it.
    adapters = [a for a in adapters if a.state != DRAINING_STATE]
    for status in adapters:
        name = [status.name]
        for value in ADAPTER_STATES:
            state.add_metric([status.name, value], float(status.state == value))
        resident.add_metric(name, float(status.gpu_rows > 0))
        rows.add_metric(name, float(status.gpu_rows))
        pinned.add_metric(name, float(status.pinned))
        refs.add_metric(name, float(status.num_refs))
        loads.add_metric(name, float(status.num_loads))
        evictions.add_metric(name, float(status.num_evictions + status.num_host_drops))
        load_s.add_metric(name, status.last_load_s)
    yield _gauge("lorasrv_adapters_registered", "Registered adapters.", len(adapters))
    yield from (state, resident, rows, pinned, refs, loads, evictions, load_s)
