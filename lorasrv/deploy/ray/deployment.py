"""Starting and stopping the Ray side: the cluster connection, the adapter registry actor and the
replica deployment. The ingress (`RoutedEngine` in lorasrv's HTTP app) runs in this process.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, NamedTuple

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from lorasrv.config import ServerConfig
from lorasrv.deploy.ray.registry import AdapterRegistry
from lorasrv.deploy.ray.replica import LorasrvReplica
from lorasrv.deploy.ray.replica_core import EngineFactory
from lorasrv.deploy.ray.settings import RaySettings, deployment_options, max_adapters
from lorasrv.engine.engine import Engine

log = logging.getLogger(__name__)


class Deployment(NamedTuple):
    handle: DeploymentHandle[Any]
    registry: Any  # the registry actor's handle


def start_ray(settings: RaySettings) -> None:
    """Connect to `--ray-address`, or start a local cluster (no dashboard, no Serve proxy: the
    ingress is lorasrv's own HTTP app)."""
    if not ray.is_initialized():
        ray.init(
            address=settings.ray_address,
            num_cpus=None if settings.ray_address else settings.ray_num_cpus,
            include_dashboard=False,
            log_to_driver=True,
        )
    serve.start(proxy_location="Disabled")


def registry_name(app_name: str) -> str:
    return f"lorasrv-adapters-{app_name}"


def deploy(
    config: ServerConfig,
    settings: RaySettings,
    *,
    make_engine: EngineFactory = Engine,
    **serve_options: Any,
) -> Deployment:
    """A fresh registry, then the replicas; returns once every replica's engine is up.
    `serve_options` go to `serve.deployment` as they are (e.g. a `request_router_config`)."""
    name = registry_name(settings.app_name)
    with contextlib.suppress(ValueError):  # a registry left over from an earlier run
        ray.kill(ray.get_actor(name))
    registry = ray.remote(AdapterRegistry).options(name=name, num_cpus=0).remote()
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0  # type: ignore[no-untyped-call]
    options = deployment_options(settings, config, cluster_has_gpus=has_gpus) | serve_options
    replica = serve.deployment(**options)(LorasrvReplica)
    app = replica.bind(config, registry, max_adapters(settings, config), make_engine)
    log.info("deploying %s: %s", settings.app_name, options)
    handle = serve.run(app, name=settings.app_name, route_prefix=None)
    return Deployment(handle=handle, registry=registry)


def teardown(settings: RaySettings) -> None:
    """Delete the app and the registry; leave the cluster (and shut it if we started it)."""
    with contextlib.suppress(Exception):
        serve.delete(settings.app_name)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(registry_name(settings.app_name)))
