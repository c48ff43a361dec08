"""Startup inference of the LoRA pool: max rank and union of modules, and the flags it names."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from lorasrv.config import SUPPORTED_LORA_MODULES, AdapterConfig, LoraRef
from lorasrv.engine.lora_spec import infer_pool_spec
from lorasrv.errors import ConfigError


class Peft(NamedTuple):
    max_rank: int
    target_modules: tuple[str, ...]


REFS = (LoraRef(lora_name="a", lora_path="/a"), LoraRef(lora_name="b", lora_path="/b"))
PEFTS = [Peft(8, ("v_proj", "q_proj")), Peft(16, ("down_proj", "q_proj"))]


def test_infers_max_rank_and_union_in_canonical_order() -> None:
    spec = infer_pool_spec(AdapterConfig(lora_paths=REFS), PEFTS, has_cuda=False, has_triton=True)
    assert spec.enabled
    assert spec.max_rank == 16
    assert spec.num_slots == 8
    # q and v are slices of the fused qkv weight: the pool holds k's slice too (as SGLang)
    assert spec.target_modules == ("q_proj", "k_proj", "v_proj", "down_proj")
    assert spec.backend == "torch"


def test_explicit_flags_win_and_all_means_every_module() -> None:
    cfg = AdapterConfig(
        lora_paths=REFS, max_lora_rank=64, lora_target_modules=("all",), max_loras_per_batch=3
    )
    spec = infer_pool_spec(cfg, PEFTS, has_cuda=True, has_triton=True)
    assert spec.max_rank == 64
    assert spec.target_modules == SUPPORTED_LORA_MODULES
    assert spec.num_slots == 3
    assert spec.backend == "triton"


def test_lora_off_gives_no_pool() -> None:
    spec = infer_pool_spec(AdapterConfig(), [], has_cuda=True, has_triton=True)
    assert not spec.enabled
    assert spec.num_slots == 0


@pytest.mark.parametrize(
    ("cfg", "flag"),
    [
        (AdapterConfig(enable_lora=True), "--max-lora-rank"),
        (AdapterConfig(enable_lora=True, max_lora_rank=8), "--lora-target-modules"),
        (AdapterConfig(lora_paths=REFS, lora_backend="triton"), "--lora-backend"),
    ],
)
def test_impossible_combinations_name_the_flag(
    cfg: AdapterConfig, flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=flag):
        infer_pool_spec(cfg, PEFTS if cfg.lora_paths else [], has_cuda=False, has_triton=True)


@pytest.mark.parametrize(
    ("flag", "pool"),
    [
        (("q_proj", "v_proj", "gate_proj"),
         ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")),
        (("up_proj", "o_proj"), ("o_proj", "gate_proj", "up_proj")),
        (("down_proj",), ("down_proj",)),
    ],
)  # fmt: skip
def test_fused_modules_count_as_one(flag: tuple[str, ...], pool: tuple[str, ...]) -> None:
    cfg = AdapterConfig(enable_lora=True, max_lora_rank=8, lora_target_modules=flag)
    assert infer_pool_spec(cfg, [], has_cuda=False, has_triton=True).target_modules == pool
