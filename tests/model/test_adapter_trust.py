"""Adapter files built to break the server (huge alpha, NaN/Inf/huge weights, int8 weights,
backtracking regexes, odd JSON) are refused at load, each refusal naming its field or tensor."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasrv.config import SUPPORTED_LORA_MODULES
from lorasrv.model.adapter_loader import load_adapter
from lorasrv.model.arch import ModelArch, read_arch
from lorasrv.model.lora_layout import AdapterWeights
from lorasrv.peft_config import AdapterLoadError
from lorasrv.safe_regex import regex_problem

WEIGHTS = "adapter_model.safetensors"
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture
def arch(checkpoint_dir: Callable[[str], Path]) -> ModelArch:
    return read_arch(str(checkpoint_dir("llama")))


@pytest.fixture
def qv_copy(adapter_dir: Callable[[str], Path], tmp_path: Path) -> Path:
    """A private copy of the rank-4 q/v adapter (alpha 8: scaling 2), free to break."""
    return Path(shutil.copytree(adapter_dir("qv_r4"), tmp_path / "adapter"))


def load(path: Path, arch: ModelArch, dtype: torch.dtype = torch.float32) -> AdapterWeights:
    return load_adapter(
        str(path), arch=arch, max_rank=16, target_modules=SUPPORTED_LORA_MODULES, dtype=dtype
    )


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def edit_tensor(path: Path, key: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> None:
    state = {k: v.clone() for k, v in load_file(str(path / WEIGHTS)).items()}
    state[key] = edit(state[key])
    save_file(state, str(path / WEIGHTS))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lora_alpha": 1e308}, r"lora_alpha 1e\+308 is not representable in float32"),
        ({"lora_alpha": 10**400}, "lora_alpha is too large"),
        ({"lora_alpha": 1e-40}, r"lora_alpha 1e-40 .* not representable in float32"),
        ({"lora_alpha": 0}, "lora_alpha must not be 0"),
        ({"lora_alpha": "16"}, "lora_alpha must be a number"),
        ({"r": 2**40}, "r must be a positive integer up to 2147483647"),
        ({"alpha_pattern": {"q_proj": 1e38}, "lora_alpha": 1e-30},
         r"alpha_pattern\['q_proj'\] = 1e\+38 .* not representable in float32"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive"),
        ({"rank_pattern": {str(i): 4 for i in range(3000)}}, "at most 2048"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": "("}, "target_modules pattern .* not a valid regular expression"),
        ({"target_modules": "(.*)*x"}, "target_modules pattern .* backtrack"),
        ({"rank_pattern": {"(a|b.*)+c": 2}}, "rank_pattern pattern .* backtrack"),
        ({"alpha_pattern": {".*.*.*.*q": 2}}, "alpha_pattern pattern .* unbounded repeats"),
    ],
)  # fmt: skip
def test_config_values_refused(
    qv_copy: Path, arch: ModelArch, changes: dict[str, Any], message: str
) -> None:
    edit_config(qv_copy, **changes)
    started = time.monotonic()
    with pytest.raises(AdapterLoadError, match=message):
        load(qv_copy, arch)
    assert time.monotonic() - started < 5  # no regex left to backtrack for minutes


@pytest.mark.parametrize(
    ("key", "edit", "message"),
    [
        (KEY_A, lambda t: t.index_fill(1, torch.tensor([3]), float("nan")), "NaN or infinite"),
        (KEY_B, lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "NaN or infinite"),
        (KEY_B, lambda t: t.index_fill(0, torch.tensor([0]), -float("inf")), "NaN or infinite"),
        (KEY_A, lambda t: t * 1e6, r"values up to \d.*e\+0[56] in magnitude"),
        (KEY_A, lambda t: (t * 100).to(torch.int8), "is int8; only float16"),
    ],
)
def test_weight_values_refused(
    qv_copy: Path,
    arch: ModelArch,
    key: str,
    edit: Callable[[torch.Tensor], torch.Tensor],
    message: str,
) -> None:
    edit_tensor(qv_copy, key, edit)
    with pytest.raises(AdapterLoadError, match=f"tensor {key} .*{message}|{message}"):
        load(qv_copy, arch)


def test_pattern_scaling_folded_into_b_is_bounded(qv_copy: Path, arch: ModelArch) -> None:
    # Finite tensors and scalings, but q_proj's B times its pattern ratio (5e6) is absurd.
    edit_config(qv_copy, alpha_pattern={"q_proj": 1e7})
    with pytest.raises(AdapterLoadError, match=r"qkv_proj lora_B \(pattern scaling applied\)"):
        load(qv_copy, arch)


def test_fp16_serving_keeps_accepted_weights_finite(qv_copy: Path, arch: ModelArch) -> None:
    edit_tensor(qv_copy, KEY_A, lambda t: t / t.abs().max() * 9e3)  # large but accepted
    weights = load(qv_copy, arch, dtype=torch.float16)
    assert all(bool(torch.isfinite(m.a).all()) for m in weights.modules.values())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('["<tool>"]', "must be an object of token -> integer id"),
        ('{"<tool>": "3"}', "must be an object of token -> integer id"),
        ("{oops", r"invalid added_tokens\.json"),
        ('{"<tool>": -1}', "beyond the base vocabulary"),
    ],
)
def test_added_tokens_refused(qv_copy: Path, arch: ModelArch, content: str, message: str) -> None:
    (qv_copy / "added_tokens.json").write_text(content)
    with pytest.raises(AdapterLoadError, match=message):
        load(qv_copy, arch)


def test_alpha_patterns_and_legit_regexes_still_load(qv_copy: Path, arch: ModelArch) -> None:
    edit_config(qv_copy, alpha_pattern={"q_proj": 0.0}, target_modules=r".*\.(q_proj|v_proj)")
    weights = load(qv_copy, arch)
    assert not weights.modules[0, "qkv_proj"].b[: arch.q_size].any()  # alpha 0: q delta off
    assert weights.modules[0, "qkv_proj"].b[arch.q_size :].any()


@pytest.mark.parametrize(
    "pattern",
    [r"q_proj", r".*\.(q_proj|v_proj)", r"(.*\.)?down_proj", r"model.layers.(1[0-5]|[0-9]).mlp"],
)
def test_peft_style_regexes_pass(pattern: str) -> None:
    assert regex_problem(pattern) is None
