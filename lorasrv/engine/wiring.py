"""Builds the actors of one engine around its started runner and wires them: the scheduler and
the others message each other in a cycle, so the scheduler, built last, is reached through a
forwarder. Owns nothing once it returns.
"""

from __future__ import annotations

from typing import Generic, NamedTuple, Protocol, TypeVar

from lorasrv.config import ServerConfig, lora_enabled
from lorasrv.engine.actor import Sender
from lorasrv.engine.adapter_manager import AdapterManagerActor
from lorasrv.engine.gpu_runner import GpuRunnerActor
from lorasrv.engine.outputs import CacheSink, OpSink, OutputSink
from lorasrv.engine.parts import EngineParts
from lorasrv.engine.planner import effective_capacity
from lorasrv.engine.scheduler import SchedulerActor
from lorasrv.engine.stats import StatsSink
from lorasrv.engine.tokenizer import TokenizerActor
from lorasrv.errors import ConfigError
from lorasrv.messages import RunnerReady, SchedulerInbox

M = TypeVar("M")


class Forward(Generic[M]):
    """A sender whose target is set once it exists."""

    def __init__(self) -> None:
        self.target: Sender[M] | None = None

    def send(self, msg: M, /) -> None:
        assert self.target is not None, "message sent before the engine finished wiring"
        self.target.send(msg)


class Sinks(OutputSink, StatsSink, Protocol):
    """Where the actors hand requests' outputs and stats to the Engine."""


class OpSinks(OpSink, CacheSink, Protocol):
    """Where the actors answer admin operations (the Engine's AdminOps)."""


class Actors(NamedTuple):
    tokenizer: TokenizerActor
    scheduler: SchedulerActor
    adapters: AdapterManagerActor
    runner: GpuRunnerActor
    capacity: int  # distinct adapters a batch may hold (the effective --max-loras-per-batch)


def lora_capacity(config: ServerConfig, ready: RunnerReady) -> int:
    """The effective --max-loras-per-batch; refuses an arena that holds no adapter."""
    cfg = config.adapters
    capacity = effective_capacity(ready, cfg.max_loras_per_batch)
    if lora_enabled(cfg) and capacity < 1:
        raise ConfigError(
            f"the GPU memory left for KV and adapters holds no adapter of rank "
            f"--max-lora-rank {ready.max_lora_rank}; lower it, or raise "
            "--mem-fraction-static / --kv-cache-bytes"
        )
    return capacity


def wire_actors(
    parts: EngineParts,
    config: ServerConfig,
    runner: GpuRunnerActor,
    ready: RunnerReady,
    to_scheduler: Forward[SchedulerInbox],
    sinks: Sinks,
    ops: OpSinks,
) -> Actors:
    """The actors over a started `runner` (which reported `ready`), whose scheduler sends go
    to `to_scheduler`."""
    adapter_cfg = config.adapters
    capacity = lora_capacity(config, ready)
    tokenizer = TokenizerActor(
        tokenizer=parts.tokenizer, scheduler=to_scheduler, outputs=sinks,
        vocab_size=ready.vocab_size,
    )  # fmt: skip
    adapters = AdapterManagerActor(
        cfg=adapter_cfg,
        capacity=capacity,
        max_rank=ready.max_lora_rank,
        target_modules=ready.lora_target_modules,
        read_config=parts.read_adapter_config,
        load_weights=(
            parts.make_adapter_loader(runner.runner) if lora_enabled(adapter_cfg) else _lora_off
        ),
        scheduler=to_scheduler,
        runner=runner,
        ops=ops,
    )
    scheduler = to_scheduler.target = SchedulerActor(
        cfg=config.scheduler, adapter_cfg=adapter_cfg, ready=ready, tokenizer=tokenizer,
        adapters=adapters, runner=runner, stats=sinks, ops=ops,
    )  # fmt: skip
    scheduler.publish_stats()  # capacity and page counts, before any request
    return Actors(tokenizer, scheduler, adapters, runner, capacity)


def _lora_off(path: str) -> object:
    """The loader with LoRA off: never called (the engine refuses the load before)."""
    raise ValueError("LoRA is not enabled on this server")
