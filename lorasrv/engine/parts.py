"""Builds the real parts an Engine runs (model path, runner factory, tokenizer, adapter I/O) from
the config. Tests inject their own EngineParts (FakeRunner, fake tokenizer) instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec

from lorasrv.config import LoraRef, ServerConfig
from lorasrv.engine.gpu_runner import adapter_loader_for, model_runner_factory
from lorasrv.engine.hf_tokenizer import Detokenizer
from lorasrv.engine.lora_spec import infer_pool_spec
from lorasrv.engine.step_runner import StepRunner
from lorasrv.errors import ConfigError

logger = logging.getLogger(__name__)


class EngineParts(NamedTuple):
    model_path: str
    runner_factory: Callable[[], StepRunner]
    tokenizer: Detokenizer
    read_adapter_config: Callable[[str], Any]
    make_adapter_loader: Callable[[StepRunner], Callable[[str], object]]
    initial_adapters: tuple[LoraRef, ...]
    config: ServerConfig
    adapter_loader: Callable[[str], object] | None = None


async def prepare_parts(config: ServerConfig) -> EngineParts:
    from lorasrv.engine.hf_tokenizer import HfTokenizer
    from lorasrv.hub import resolve_path
    from lorasrv.peft_config import read_peft_config

    model_cfg = config.model
    if model_cfg.model_path is None:
        config = await asyncio.to_thread(_with_demo_model, config)
        model_cfg = config.model
    assert model_cfg.model_path is not None
    try:
        model_path = await asyncio.to_thread(
            resolve_path, model_cfg.model_path, revision=model_cfg.revision
        )
        tokenizer_path = model_path
        if model_cfg.tokenizer_path is not None:
            tokenizer_path = await asyncio.to_thread(resolve_path, model_cfg.tokenizer_path)
        tokenizer = await asyncio.to_thread(HfTokenizer.from_dir, tokenizer_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model-path: {exc}") from None  # exc names the path
    initial = config.adapters.lora_paths
    peft_configs = []
    for ref in initial:
        try:
            peft_configs.append(await asyncio.to_thread(read_peft_config, ref.lora_path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--lora-paths {ref.lora_name}: {exc}") from None
    pool = infer_pool_spec(
        config.adapters, peft_configs, has_cuda=_has_cuda(config), has_triton=_has_triton()
    )
    return EngineParts(
        model_path=model_path,
        runner_factory=model_runner_factory(config, model_path, pool),
        tokenizer=tokenizer,
        read_adapter_config=read_peft_config,
        make_adapter_loader=adapter_loader_for,
        initial_adapters=initial,
        config=config,
    )


def _with_demo_model(config: ServerConfig) -> ServerConfig:
    """No --model-path: serve the embedded demo model, with its adapters unless others are given."""
    from lorasrv.demo import ensure_demo_model

    demo = ensure_demo_model()
    logger.info("no --model-path: serving the embedded demo model at %s", demo.model_path)
    model = msgspec.structs.replace(config.model, model_path=demo.model_path)
    if not model.served_model_name:
        model = msgspec.structs.replace(model, served_model_name="lorasrv-demo")
    adapters = config.adapters
    if not adapters.lora_paths:
        refs = tuple(LoraRef(lora_name=n, lora_path=p) for n, p in demo.adapters.items())
        adapters = msgspec.structs.replace(adapters, lora_paths=refs)
    return msgspec.structs.replace(config, model=model, adapters=adapters)


def _has_cuda(config: ServerConfig) -> bool:
    if config.model.device == "cpu":
        return False
    import torch

    return bool(torch.cuda.is_available())


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None
