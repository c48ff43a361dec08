"""Startup inference of the LoRA pool's shape (as SGLang does): rank and target modules default to
the maximum and union over `--lora-paths`, fused modules counted as one (q/k/v, gate/up). Pure:
adapter configs arrive already read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from lorasrv.config import SUPPORTED_LORA_MODULES, AdapterConfig, lora_enabled
from lorasrv.errors import ConfigError


class PeftLike(Protocol):
    @property
    def max_rank(self) -> int: ...

    @property
    def target_modules(self) -> tuple[str, ...]: ...


class LoraPoolSpec(NamedTuple):
    enabled: bool
    num_slots: int
    max_rank: int
    target_modules: tuple[str, ...]
    backend: str  # "torch" | "triton"


DISABLED = LoraPoolSpec(enabled=False, num_slots=0, max_rank=0, target_modules=(), backend="torch")
#: modules the model runs as one fused weight: the pool holds all of a group's slices as soon as
#: one is targeted, so an adapter may train any of them (SGLang's qkv_proj and gate_up_proj)
FUSED_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
)


def infer_pool_spec(
    cfg: AdapterConfig, initial: Sequence[PeftLike], *, has_cuda: bool, has_triton: bool
) -> LoraPoolSpec:
    if not lora_enabled(cfg):
        return DISABLED
    if cfg.max_lora_rank is not None:
        max_rank = cfg.max_lora_rank
    elif initial:
        max_rank = max(a.max_rank for a in initial)
    else:
        raise ConfigError("--enable-lora without --lora-paths needs --max-lora-rank")
    if cfg.lora_target_modules is not None:
        wanted = set(cfg.lora_target_modules)
        targets = SUPPORTED_LORA_MODULES if "all" in wanted else _ordered(wanted)
    elif initial:
        targets = _ordered({m for a in initial for m in a.target_modules})
    else:
        raise ConfigError("--enable-lora without --lora-paths needs --lora-target-modules")
    return LoraPoolSpec(
        enabled=True,
        num_slots=cfg.max_loras_per_batch,
        max_rank=max_rank,
        target_modules=targets,
        backend=_backend(cfg.lora_backend, has_cuda=has_cuda, has_triton=has_triton),
    )


def _ordered(modules: set[str]) -> tuple[str, ...]:
    """In SUPPORTED_LORA_MODULES order, with the partners of every fused module targeted."""
    for group in FUSED_GROUPS:
        if modules & group:
            modules = modules | group
    return tuple(m for m in SUPPORTED_LORA_MODULES if m in modules)


def _backend(requested: str, *, has_cuda: bool, has_triton: bool) -> str:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if requested == "auto":
        return "triton" if has_cuda and has_triton else "torch"
    if requested == "triton":
        if not has_triton:
            raise ConfigError("--lora-backend triton: the triton package is not installed")
        if not has_cuda and not interpreted:
            raise ConfigError(
                "--lora-backend triton needs a CUDA device (or TRITON_INTERPRET=1); "
                "use --lora-backend torch on CPU"
            )
    return requested
