"""Checks an adapter load or unload before the adapter manager sees it, so each failure has its
own error class (a missing folder is AdapterNotFound, 404; a refused one AdapterError, 400) and a
refused replacement never touches the version being served. Reads the adapter's config only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from lorasrv.config import adapter_name_problem
from lorasrv.engine.adapter_state import check_compatible
from lorasrv.errors import AdapterError, AdapterNotFound, BadRequest
from lorasrv.messages import AdapterStatus, RunnerReady

DRAINING = "unloading"  # AdapterStatus.state of a version that is leaving
HOST_DROPPED = "unloaded"  # registered, but out of host memory (--max-loaded-loras)


def live_adapters(statuses: Iterable[AdapterStatus]) -> dict[str, AdapterStatus]:
    """The version of each name new requests get (draining versions left out)."""
    return {s.name: s for s in statuses if s.state != DRAINING}


def check_load_names(lora_name: str, lora_path: str) -> None:
    problem = adapter_name_problem(lora_name)
    if problem is not None:
        raise BadRequest(problem)
    if not lora_path:
        raise BadRequest("lora_path must not be empty: give the adapter's folder or Hub id")


def check_not_loaded(name: str, live: dict[str, AdapterStatus]) -> None:
    if name in live:
        raise AdapterError(
            f"adapter {name!r} has already been loaded; unload it first, or replace it in place"
        )


def check_loaded(name: str, live: dict[str, AdapterStatus]) -> None:
    if name not in live:
        raise AdapterNotFound(f"adapter {name!r} cannot be found: it is not loaded")


async def check_folder(read_config: Callable[[str], Any], ready: RunnerReady, path: str) -> None:
    """The folder exists, its config is one lorasrv serves, and it fits the LoRA pool."""
    try:
        peft = await asyncio.to_thread(read_config, path)
        check_compatible(
            peft.max_rank,
            peft.target_modules,
            max_rank=ready.max_lora_rank,
            target_modules=ready.lora_target_modules,
        )
    except FileNotFoundError as exc:
        raise AdapterNotFound(f"no adapter found at {path!r}: {exc}") from None
    except (ValueError, OSError) as exc:
        raise AdapterError(f"cannot load adapter from {path!r}: {exc}") from None
