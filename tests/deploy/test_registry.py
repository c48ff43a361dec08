"""The adapter registry's rules and waits, the deployment-wide views of replica reports, and the
settings that become Ray Serve options. No Ray."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lorasrv.config import LoraRef, ServerConfig, build_config
from lorasrv.deploy.ray import registry as registry_module
from lorasrv.deploy.ray.__main__ import parse
from lorasrv.deploy.ray.deployment_view import (
    DeploymentMetrics,
    adapter_statuses,
    summed_stats,
)
from lorasrv.deploy.ray.protocol import AdapterEntry, ReplicaReport
from lorasrv.deploy.ray.registry import AdapterRegistry, RegistryState
from lorasrv.deploy.ray.settings import deployment_options, load_settings
from lorasrv.errors import ConfigError
from lorasrv.ids import AdapterId
from lorasrv.messages import AdapterStatus
from lorasrv.metrics import EngineSnapshot, Metrics

TIMEOUT_S = 2


def report(rid: str, applied: int, **fields: Any) -> ReplicaReport:
    return ReplicaReport(replica_id=rid, pid=1, healthy=True, applied=applied, **fields)


def test_registration_rules_and_generations() -> None:
    state = RegistryState()
    state.seed((LoraRef(lora_name="a", lora_path="/a"),))
    state.seed((LoraRef(lora_name="zombie", lora_path="/z"),))  # later replicas seed nothing
    problem, _ = state.register("a", "/other", False)
    assert problem == "adapter 'a' has already been loaded; unload it first, or replace it in place"
    assert state.unregister("nope") == "adapter 'nope' cannot be found: it is not loaded"
    first = state.entries["a"]
    assert state.register("a", "/a2", True, replace=True) == (None, first)
    assert state.entries["a"].generation > first.generation  # holders of /a must drop it
    state.restore("a", first)  # a refused replacement: the old version again, same generation
    assert state.entries["a"] == first
    assert state.unregister("a") is None
    assert state.register("a", "/a3", False) == (None, None)
    assert (state.version, list(state.entries)) == (5, ["a"])


def test_only_live_replicas_count() -> None:
    state = RegistryState()
    state.report(report("old", 0), now=0.0)
    state.report(report("new", 2, errors={"x": "boom", "y": "other"}), now=10.0)
    assert [r.replica_id for r in state.alive(now=10.0)] == ["new"]
    assert state.behind(3, now=10.0) == ["new"]
    assert state.failures(2, frozenset({"x"}), now=10.0) == ["replica new: boom"]


async def test_wait_applied_returns_when_every_live_replica_has_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = AdapterRegistry()
    async with asyncio.timeout(TIMEOUT_S):
        await registry.report(report("r0", 0))
        await registry.report(report("r1", 0))
        problem, version, _ = await registry.register("c", "/c", False)
        assert problem is None
        waiting = asyncio.create_task(registry.wait_applied(version, frozenset({"c"})))
        watched = await registry.watch(0, timeout_s=1.0)  # wakes on the change
        assert watched.version == version
        assert "c" in watched.entries
        await registry.report(report("r0", version))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # r1 has not applied it yet
        await registry.report(report("r1", version, errors={"c": "no room"}))
        assert await waiting == ["replica r1: no room"]
        # A replica that stops beating stops counting.
        monkeypatch.setattr(registry_module, "REPLICA_TTL_S", 0.05)
        problem, version = await registry.unregister("c")
        await registry.report(report("r0", version))
        assert await registry.wait_applied(version, frozenset({"c"})) == []


def status(name: str, state: str, refs: int, loads: int, path: str = "/p") -> AdapterStatus:
    return AdapterStatus(
        name=name, path=path, adapter_id=AdapterId(1), state=state, slot=0, rank=8,
        pinned=False, num_refs=refs, num_loads=loads,
    )  # fmt: skip


def test_adapter_states_and_counts_fold_over_replicas() -> None:
    entries = [
        AdapterEntry(name="a", path="/p", generation=1),
        AdapterEntry(name="fresh", path="/p", generation=2),
    ]
    reports = [
        report("r0", 1, adapters=(status("a", "cpu_loaded", 1, 1),)),
        report("r1", 1, adapters=(status("a", "gpu_resident", 2, 1),
                                  status("a", "pinned", 9, 9, path="/stale"))),
    ]  # fmt: skip
    folded = {s.name: s for s in adapter_statuses(entries, reports)}
    assert (folded["a"].state, folded["a"].num_refs, folded["a"].num_loads) == (
        "gpu_resident", 3, 2,
    )  # fmt: skip
    assert (folded["fresh"].state, folded["fresh"].num_loads) == ("unloaded", 0)
    stats = summed_stats([
        report("r0", 1, stats={"num_running": 2, "last_step_s": 0.5}),
        report("r1", 1, stats={"num_running": 3, "last_step_s": 0.2}),
    ])  # fmt: skip
    assert (stats.num_running, stats.last_step_s) == (5, 0.5)


def test_metrics_keep_the_ingress_series_and_label_each_replica() -> None:
    replica = Metrics()
    replica.requests.labels("a", "stop").inc(3)
    text = replica.render(EngineSnapshot(num_running=4))
    reports = [report("r0", 0, metrics=text), report("r1", 0, metrics=text)]
    ingress = DeploymentMetrics(lambda: reports)
    ingress.requests.labels("a", "stop").inc(6)
    families = {f.name: f for f in text_string_to_metric_families(ingress.render(
        EngineSnapshot(num_running=8)).decode())}  # fmt: skip
    requests = {
        s.labels.get("replica"): s.value
        for s in families["lorasrv_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests == {None: 6.0, "r0": 3.0, "r1": 3.0}
    running = {
        s.labels.get("replica"): s.value for s in families["lorasrv_num_running_requests"].samples
    }
    assert running == {None: 8.0, "r0": 4.0, "r1": 4.0}


def test_settings_become_serve_options() -> None:
    config = build_config({"tp_size": 2, "max_loras_per_batch": 4})
    fixed = deployment_options(load_settings({"num_replicas": 3}), config, cluster_has_gpus=True)
    assert (fixed["num_replicas"], fixed["ray_actor_options"]["num_gpus"]) == (3, 2.0)
    scaled = deployment_options(
        load_settings({"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}),
        ServerConfig(),
        cluster_has_gpus=False,
    )
    assert "num_replicas" not in scaled
    assert scaled["ray_actor_options"]["num_gpus"] == 0.0
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 8,
    }  # fmt: skip
    with pytest.raises(ConfigError, match="min-replicas"):
        load_settings({"min_replicas": 5, "max_replicas": 2})


def test_the_command_line_splits_ray_flags_from_server_flags() -> None:
    settings, config = parse(
        ["--num-replicas", "2", "--max-loras-per-batch", "4", "--port", "8001",
         "--max-ongoing-requests", "16", "--num-cpus-per-replica", "0.5"]
    )  # fmt: skip
    assert (settings.num_replicas, settings.max_ongoing_requests) == (2, 16)
    assert settings.num_cpus_per_replica == 0.5
    assert (config.adapters.max_loras_per_batch, config.http.port) == (4, 8001)
