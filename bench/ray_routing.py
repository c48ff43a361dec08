"""Adapter-affinity routing (Ray Serve multiplexing) against round-robin, measured in one run.

2 replicas, 16 adapters (the demo's two adapter folders under 16 names), Zipf popularity, the same
seeded workload through the same routed HTTP ingress; only the deployment's request router differs.
Per routing: output tok/s, distinct adapters per engine step (mean over the replicas' steps, from
a counter on each replica's runner), adapter slot loads and evictions, requests per replica.

    python bench/ray_routing.py            # CPU demo model, ~2-3 min on 2 cores
    python bench/ray_routing.py --requests 512 --concurrency 32 --max-loras-per-batch 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from typing import Any

import aiohttp
import ray
from aiohttp import web
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from lorasrv.config import ServerConfig, build_config
from lorasrv.demo import ensure_demo_model
from lorasrv.deploy.ray.deployment import Deployment, deploy, start_ray, teardown
from lorasrv.deploy.ray.ingress import RoutedEngine
from lorasrv.deploy.ray.serve_client import ServeClient
from lorasrv.deploy.ray.settings import load_settings
from lorasrv.engine.engine import Engine
from lorasrv.engine.parts import prepare_parts
from lorasrv.http.app import build_app, make_runner

NUM_ADAPTERS = 16
STEPS = "lorasrv_bench_steps_total"
STEP_ADAPTERS = "lorasrv_bench_step_adapters_total"


class RoundRobinRouter(FIFOMixin, RequestRouter):
    """Replicas in turn, whatever the adapter (the next one if it is full)."""

    turn = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if not ordered:
            return []
        self.turn += 1
        first = self.turn % len(ordered)
        return [[ordered[first]], ordered[first + 1 :] + ordered[:first]]


class _StepCounter:
    """The replica's runner, counting the distinct adapters of every step it runs."""

    def __init__(self, inner: Any, steps: PromCounter, adapters: PromCounter) -> None:
        self.inner, self._steps, self._adapters = inner, steps, adapters

    def launch(self, plan: Any) -> Any:
        if plan.seq_ids:
            self._steps.inc()
            self._adapters.inc(len({index for index in plan.lora_adapters if index >= 0}))
        return self.inner.launch(plan)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CountingEngine(Engine):
    """An Engine whose runner counts adapters per step into the engine's own /metrics."""

    async def start(self) -> None:
        parts = await prepare_parts(self.config)
        reg = self.metrics.registry
        steps = PromCounter(STEPS.removesuffix("_total"), "Engine steps run.", registry=reg)
        adapters = PromCounter(
            STEP_ADAPTERS.removesuffix("_total"), "Distinct adapters, summed over steps.",
            registry=reg,
        )  # fmt: skip
        make_runner = parts.runner_factory
        self._parts = parts._replace(
            runner_factory=lambda: _StepCounter(make_runner(), steps, adapters),
            make_adapter_loader=lambda runner: parts.make_adapter_loader(runner.inner),
        )
        await super().start()


def workload(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    weights = [1.0 / (rank + 1) ** args.zipf for rank in range(NUM_ADAPTERS)]
    names = [f"lora{i:02d}" for i in range(NUM_ADAPTERS)]
    sampling = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
    return [
        {"input_ids": [rng.randrange(10, 900) for _ in range(args.input_len)],
         "lora_path": rng.choices(names, weights)[0], "sampling_params": sampling}
        for _ in range(args.requests)
    ]  # fmt: skip


async def per_replica(url: str) -> dict[str, Counter[str]]:
    """family -> replica -> value, from the replicas' own series on the ingress's /metrics."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as reply:
        text = await reply.text()
    wanted = {STEPS, STEP_ADAPTERS, "lorasrv_adapter_loads_total",
              "lorasrv_adapter_evictions_total", "lorasrv_requests_total"}  # fmt: skip
    out: dict[str, Counter[str]] = {name: Counter() for name in wanted}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and "replica" in sample.labels:
                out[sample.name][sample.labels["replica"]] += sample.value
    return out


async def settled(url: str, before: dict[str, Counter[str]]) -> dict[str, Counter[str]]:
    """Metrics once the replicas' heartbeats carry the whole run (two equal reads in a row)."""
    last = await per_replica(url)
    while True:
        await asyncio.sleep(1.5)
        now = await per_replica(url)
        if now == last and now[STEPS] != before[STEPS]:
            return now
        last = now


async def measure(
    config: ServerConfig, deployment: Deployment, requests: list[dict[str, Any]], concurrency: int
) -> dict[str, Any]:
    engine = RoutedEngine(config, ServeClient(deployment.handle), deployment.registry)
    runner = make_runner(build_app(config, engine), access_log=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = "http://{}:{}".format(*runner.addresses[0][:2])
    try:
        async with aiohttp.ClientSession() as session:
            for i in range(NUM_ADAPTERS):  # warm-up: every adapter once, one at a time
                body = {**requests[0], "lora_path": f"lora{i:02d}"}
                async with session.post(url + "/generate", json=body) as reply:
                    assert reply.status == 200, await reply.text()
            before = await settled(url, {STEPS: Counter()})
            gate = asyncio.Semaphore(concurrency)

            async def one(body: dict[str, Any]) -> int:
                async with gate, session.post(url + "/generate", json=body) as reply:
                    assert reply.status == 200, await reply.text()
                    return int((await reply.json())["meta_info"]["completion_tokens"])

            started = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(body) for body in requests)))
            elapsed = time.perf_counter() - started
        after = await settled(url, before)
    finally:
        await runner.cleanup()
    delta = {name: after[name] - before[name] for name in after}
    steps = sum(delta[STEPS].values())
    return {
        "output_tok_s": round(tokens / elapsed, 1),
        "seconds": round(elapsed, 2),
        "steps": int(steps),
        "distinct_adapters_per_step": round(sum(delta[STEP_ADAPTERS].values()) / steps, 3),
        "adapter_loads": int(sum(delta["lorasrv_adapter_loads_total"].values())),
        "adapter_evictions": int(sum(delta["lorasrv_adapter_evictions_total"].values())),
        "requests_per_replica": sorted(int(v) for v in delta["lorasrv_requests_total"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--zipf", type=float, default=1.1, help="popularity exponent")
    parser.add_argument("--max-loras-per-batch", type=int, default=8)
    parser.add_argument("--max-ongoing-requests", type=int, default=32)
    parser.add_argument("--ray-num-cpus", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    demo = ensure_demo_model()
    folders = sorted(demo.adapters.values())
    config = build_config({
        "model_path": demo.model_path, "served_model_name": "lorasrv-demo", "device": "cpu",
        "max_loras_per_batch": args.max_loras_per_batch,
        "lora_paths": [f"lora{i:02d}={folders[i % len(folders)]}" for i in range(NUM_ADAPTERS)],
    })  # fmt: skip
    requests = workload(args)
    routers = {"affinity": {}, "round_robin": {
        "request_router_config": {"request_router_class": RoundRobinRouter}}}  # fmt: skip
    results: dict[str, Any] = {"args": vars(args)}
    start_ray(load_settings({"ray_num_cpus": args.ray_num_cpus}))
    try:
        for mode, options in routers.items():
            settings = load_settings({
                "app_name": f"bench-{mode}", "num_replicas": 2, "num_cpus_per_replica": 0,
                "max_ongoing_requests": args.max_ongoing_requests,
            })  # fmt: skip
            deployment = deploy(config, settings, make_engine=CountingEngine, **options)
            try:
                results[mode] = asyncio.run(measure(config, deployment, requests, args.concurrency))
            finally:
                teardown(settings)
            print(mode, json.dumps(results[mode]), flush=True)
    finally:
        ray.shutdown()
    affinity, rr = results["affinity"], results["round_robin"]
    results["throughput_affinity_over_round_robin"] = round(
        affinity["output_tok_s"] / rr["output_tok_s"], 3
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
