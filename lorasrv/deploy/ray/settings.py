"""Deployment settings (replicas, autoscaling, resources) and the Ray Serve options they become.
Pure: no Ray import, so the CLI parses and checks them before Ray starts.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from lorasrv.config import ServerConfig
from lorasrv.errors import ConfigError

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]


class RaySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    ray_address: str | None = None  # a running cluster ("auto", "ray://..."); None: start one
    ray_num_cpus: PositiveInt | None = None  # CPUs of the local cluster this command starts
    app_name: str = "lorasrv"
    num_replicas: PositiveInt = 1  # fixed size, or the initial size when autoscaling
    # Autoscaling (any of the three turns it on), passed to Ray Serve's autoscaling_config.
    min_replicas: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_replicas: PositiveInt | None = None
    target_ongoing_requests: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    # Requests a replica takes at once; beyond it Ray Serve routes an adapter's requests to
    # another replica ("while it has capacity").
    max_ongoing_requests: PositiveInt = 64
    num_cpus_per_replica: NonNegative = 1.0
    num_gpus_per_replica: NonNegative | None = None  # None: --tp-size if the cluster has GPUs
    # Adapters a replica claims for routing (Ray's multiplexed models per replica); None:
    # --max-loras-per-batch, what one batch can hold.
    max_adapters_per_replica: PositiveInt | None = None
    health_check_period_s: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0


def load_settings(options: dict[str, Any]) -> RaySettings:
    try:
        settings = msgspec.convert(options, RaySettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"ray settings: {exc}") from None
    low, high = settings.min_replicas, settings.max_replicas
    if low is not None and high is not None and low > high:
        raise ConfigError(f"--min-replicas ({low}) must be <= --max-replicas ({high})")
    return settings


def autoscaling_config(settings: RaySettings) -> dict[str, Any] | None:
    if (settings.min_replicas, settings.max_replicas, settings.target_ongoing_requests) == (
        None, None, None,
    ):  # fmt: skip
        return None
    low = settings.min_replicas if settings.min_replicas is not None else 1
    high = settings.max_replicas or max(settings.num_replicas, low, 1)
    config: dict[str, Any] = {
        "min_replicas": low,
        "max_replicas": high,
        "initial_replicas": min(max(settings.num_replicas, low), high),
    }
    if settings.target_ongoing_requests is not None:
        config["target_ongoing_requests"] = settings.target_ongoing_requests
    return config


def max_adapters(settings: RaySettings, config: ServerConfig) -> int:
    return settings.max_adapters_per_replica or config.adapters.max_loras_per_batch


def deployment_options(
    settings: RaySettings, config: ServerConfig, *, cluster_has_gpus: bool
) -> dict[str, Any]:
    """Keyword arguments of `serve.deployment(...).options(...)` for the replica deployment."""
    gpus = settings.num_gpus_per_replica
    if gpus is None:
        gpus = float(config.model.tp_size) if cluster_has_gpus else 0.0
    options: dict[str, Any] = {
        "name": "LorasrvReplica",
        "max_ongoing_requests": settings.max_ongoing_requests,
        "health_check_period_s": settings.health_check_period_s,
        "ray_actor_options": {"num_cpus": settings.num_cpus_per_replica, "num_gpus": gpus},
    }
    scaling = autoscaling_config(settings)
    if scaling is None:
        options["num_replicas"] = settings.num_replicas
    else:
        options["autoscaling_config"] = scaling
    return options
