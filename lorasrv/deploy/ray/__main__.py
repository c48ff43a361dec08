"""`python -m lorasrv.deploy.ray --config server.toml --num-replicas 2`: every `python -m lorasrv`
setting (file, LORASRV_* environment, flags) plus the Ray flags below. Deploys the replicas, then
serves the same HTTP API on --host/--port until SIGINT/SIGTERM, then deletes the deployment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, get_type_hints

from lorasrv.cli import build_parser, parse_config
from lorasrv.config import ServerConfig
from lorasrv.deploy.ray.settings import RaySettings, load_settings
from lorasrv.errors import ConfigError, LorasrvError

RAY_HELP = {
    "ray_address": "a running Ray cluster (e.g. auto); none: start a local one",
    "ray_num_cpus": "CPUs of the local cluster this command starts (none: all)",
    "app_name": "the Ray Serve application's name",
    "num_replicas": "replicas (engines) of the deployment; with autoscaling, the initial count",
    "min_replicas": "autoscaling: fewest replicas",
    "max_replicas": "autoscaling: most replicas",
    "target_ongoing_requests": "autoscaling: requests in flight per replica to aim for",
    "max_ongoing_requests": "requests one replica takes at once; more go to other replicas",
    "num_cpus_per_replica": "CPUs Ray reserves per replica",
    "num_gpus_per_replica": "GPUs per replica (none: --tp-size if the cluster has GPUs)",
    "max_adapters_per_replica": "adapters a replica claims for routing "
    "(none: --max-loras-per-batch)",
    "health_check_period_s": "seconds between Ray Serve's replica health checks",
}


def _ray_flags(parser: argparse.ArgumentParser) -> list[str]:
    group = parser.add_argument_group("ray (this command only)")
    defaults = RaySettings()
    names = []
    for name, hint in get_type_hints(RaySettings).items():
        kind = next((t for t in (int, float, str) if t in getattr(hint, "__args__", (hint,))), str)
        default = getattr(defaults, name)
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            help=f"{RAY_HELP[name]} (default: {'none' if default is None else default})",
        )
        names.append(name)
    return names


def parse(argv: Sequence[str]) -> tuple[RaySettings, ServerConfig]:
    parser = build_parser()
    parser.prog = "python -m lorasrv.deploy.ray"
    names = _ray_flags(parser)
    parser.parse_args(argv)  # --help, and every flag checked at once
    ray_only = argparse.ArgumentParser(add_help=False)
    _ray_flags(ray_only)
    ray_args, rest = ray_only.parse_known_args(argv)
    options: dict[str, Any] = {n: getattr(ray_args, n) for n in names}
    settings = load_settings({k: v for k, v in options.items() if v is not None})
    return settings, parse_config(rest, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, config = parse(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        print(f"lorasrv: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.http.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        from lorasrv.deploy.ray.deployment import deploy, start_ray, teardown
        from lorasrv.deploy.ray.ingress import RoutedEngine
        from lorasrv.deploy.ray.serve_client import ServeClient
    except ImportError as exc:
        print(f"lorasrv: error: {exc}; install the extra: pip install 'lorasrv[ray]'",
              file=sys.stderr)  # fmt: skip
        return 2
    from lorasrv.http.app import serve

    start_ray(settings)
    try:
        deployment = deploy(config, settings)
        client = ServeClient(deployment.handle)
        return serve(config, lambda: RoutedEngine(config, client, deployment.registry))
    except LorasrvError as exc:
        print(f"lorasrv: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        teardown(settings)
        if settings.ray_address is None:  # the local cluster this command started
            import ray

            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
