"""The deployment seen as one server: replica reports folded into adapter statuses, scheduler
counts and one Prometheus exposition. Pure (no Ray, no asyncio).

Metrics: series without a `replica` label are the ingress's own (HTTP requests, and requests as
its clients saw them: the deployment as a whole); each replica's own series follow under the same
names with `replica="<id>"` added.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from lorasrv.deploy.ray.protocol import AdapterEntry, ReplicaReport
from lorasrv.engine.stats import SchedulerStats
from lorasrv.ids import AdapterId
from lorasrv.messages import AdapterStatus
from lorasrv.metrics import EngineSnapshot, Metrics

REPLICA_LABEL: Final = "replica"
#: where an adapter is furthest along, over the replicas (a registered adapter no replica has
#: loaded yet is "unloaded": it loads on first use)
STATE_ORDER: Final = ("unloaded", "unloading", "loading", "cpu_loaded", "evicting",
                      "gpu_resident", "pinned")  # fmt: skip


def adapter_statuses(
    entries: Iterable[AdapterEntry], reports: Sequence[ReplicaReport]
) -> tuple[AdapterStatus, ...]:
    """One status per registered adapter: refs, loads and evictions summed over replicas."""
    held: dict[str, list[AdapterStatus]] = {}
    for report in reports:
        for status in report.adapters:
            held.setdefault(status.name, []).append(status)
    out = []
    for entry in entries:
        mine = [s for s in held.get(entry.name, []) if s.path == entry.path]
        states = [s.state for s in mine if s.state in STATE_ORDER]
        out.append(
            AdapterStatus(
                name=entry.name,
                path=entry.path,
                adapter_id=AdapterId(entry.generation),
                state=max(states, key=STATE_ORDER.index, default="unloaded"),
                slot=None,  # slots are per replica: see the replica series
                rank=max((s.rank for s in mine), default=0),
                pinned=entry.pinned,
                num_refs=sum(s.num_refs for s in mine),
                num_loads=sum(s.num_loads for s in mine),
                num_evictions=sum(s.num_evictions for s in mine),
                last_load_s=max((s.last_load_s for s in mine), default=0.0),
            )
        )
    return tuple(out)


def summed_stats(reports: Sequence[ReplicaReport]) -> SchedulerStats:
    """Counts added over replicas; the latest step time is the slowest replica's."""
    values: dict[str, float] = {}
    for report in reports:
        for key, value in report.stats.items():
            values[key] = max(values.get(key, 0.0), value) if key == "last_step_s" else (
                values.get(key, 0.0) + value
            )  # fmt: skip
    counts = {name: int(values.get(name, 0)) for name in SchedulerStats._fields}
    return SchedulerStats(**counts)._replace(last_step_s=values.get("last_step_s", 0.0))


class DeploymentMetrics(Metrics):
    """The ingress's registry; `render` appends every live replica's series, labelled."""

    def __init__(self, reports: Callable[[], Sequence[ReplicaReport]]) -> None:
        super().__init__()
        self._reports = reports
        self.resent = Counter(
            "lorasrv_requests_resent", "Requests sent again because their replica died "
            "before they started.", registry=self.registry,
        )  # fmt: skip

    def render(self, snapshot: EngineSnapshot) -> bytes:
        own = super().render(snapshot)
        collector = _Merged([(None, own)] + [(r.replica_id, r.metrics) for r in self._reports()])
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        return generate_latest(registry)


class _Merged(Collector):
    """Families merged by name, each replica's samples carrying its id."""

    def __init__(self, texts: list[tuple[str | None, bytes]]) -> None:
        self._texts = texts

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for replica_id, text in self._texts:
            for family in text_string_to_metric_families(text.decode()):
                target = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    labels = dict(sample.labels)
                    if replica_id is not None:
                        labels[REPLICA_LABEL] = replica_id
                    target.add_sample(sample.name, labels, sample.value, sample.timestamp)
        return merged.values()
