"""Adapter config parsing and every refusal of the adapter loader, each naming its problem."""

from __future__ import annotations

import json
import shutil
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
from lorasrv.peft_config import AdapterLoadError, normalize_target_modules, read_peft_config

AdapterDir = Callable[[str], Path]
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def arch(checkpoint_dir: Callable[[str], Path]) -> ModelArch:
    return read_arch(str(checkpoint_dir("llama")))


@pytest.fixture
def qv_copy(adapter_dir: AdapterDir, tmp_path: Path) -> Path:
    """A private copy of the rank-4 q/v adapter, free to break."""
    return Path(shutil.copytree(adapter_dir("qv_r4"), tmp_path / "adapter"))


def load(path: Path, arch: ModelArch, **kwargs: Any) -> AdapterWeights:
    options: dict[str, Any] = {"max_rank": 16, "target_modules": SUPPORTED_LORA_MODULES}
    return load_adapter(str(path), arch=arch, **{**options, **kwargs})


def edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def add_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    state = {k: v.clone() for k, v in load_file(str(path / WEIGHTS)).items()}
    save_file({**state, name: tensor}, str(path / WEIGHTS))


def test_peft_patterns_match_peft(
    checkpoint_dir: Callable[[str], Path], adapter_dir: AdapterDir
) -> None:
    """rank_for / scaling_for agree with the r and scaling PEFT gives every module."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in ("mlp_r16_patterns", "all_r8_rslora"):
        config = read_peft_config(str(adapter_dir(name)))
        base = AutoModelForCausalLM.from_pretrained(checkpoint_dir("llama"))
        model = PeftModel.from_pretrained(base, adapter_dir(name))
        seen = 0
        for key, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                module_key = key.removeprefix("base_model.model.")
                assert config.rank_for(module_key) == module.r["default"], module_key
                assert config.scaling_for(module_key) == pytest.approx(module.scaling["default"])
                seen += 1
        assert seen == len(config.target_modules) * 2


def test_config_fields(adapter_dir: AdapterDir) -> None:
    config = read_peft_config(str(adapter_dir("mlp_r16_patterns")))
    assert config.target_modules == ("gate_proj", "up_proj", "down_proj")
    assert (config.r, config.max_rank, config.lora_alpha) == (16, 16, 32.0)
    assert config.rank_for("model.layers.1.mlp.up_proj") == 4
    assert config.rank_for("model.layers.0.mlp.up_proj") == 16
    rslora = read_peft_config(str(adapter_dir("all_r8_rslora")))
    assert rslora.target_modules == SUPPORTED_LORA_MODULES  # "all-linear"
    assert rslora.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(16 / 8**0.5)


def test_weights_layout(adapter_dir: AdapterDir, arch: ModelArch) -> None:
    weights = load(adapter_dir("qv_r4"), arch, dtype=torch.bfloat16)
    assert (weights.rank, weights.scaling) == (4, 2.0)
    assert weights.target_modules == ("q_proj", "v_proj")
    assert set(weights.modules) == {(0, "qkv_proj"), (1, "qkv_proj")}
    qkv = weights.modules[0, "qkv_proj"]
    assert qkv.a.shape == (3 * 4, arch.hidden_size)
    assert qkv.a.dtype == torch.bfloat16
    assert not qkv.a[4:8].any()  # k slice: not covered, zero
    assert not qkv.b[arch.q_size : arch.q_size + arch.kv_size].any()
    assert qkv.b[: arch.q_size].any()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING'"),
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "foo_proj"]}, r"\['foo_proj'\] are not supported"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embeddings/lm_head"),
        ({"target_modules": "lm_head"}, "embedding/lm_head"),
        ({"layers_to_transform": [0]}, "layers_to_transform is not supported"),
        ({"bias": "all"}, "bias 'all'"),
        ({"r": 0}, "r must be a positive integer"),
        ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
        ({"trainable_token_indices": [3]}, "trainable tokens"),
    ],
)
def test_config_refusals(
    qv_copy: Path, arch: ModelArch, changes: dict[str, Any], message: str
) -> None:
    edit_config(qv_copy, **changes)
    with pytest.raises(AdapterLoadError, match=message):
        load(qv_copy, arch)


def test_not_an_adapter(tmp_path: Path, arch: ModelArch) -> None:
    with pytest.raises(AdapterLoadError, match="no such local directory"):
        load(tmp_path / "missing", arch)
    with pytest.raises(AdapterLoadError, match=r"no adapter_config\.json"):
        load(tmp_path, arch)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match=r"invalid adapter_config\.json"):
        load(tmp_path, arch)


def test_weights_file_refusals(qv_copy: Path, arch: ModelArch) -> None:
    # clone: load_file maps the file, which is overwritten below
    state = {k: v.clone() for k, v in load_file(str(qv_copy / WEIGHTS)).items()}
    (qv_copy / WEIGHTS).write_bytes(b"\x00garbage")
    with pytest.raises(AdapterLoadError, match="corrupt or unreadable"):
        load(qv_copy, arch)
    (qv_copy / WEIGHTS).unlink()
    with pytest.raises(AdapterLoadError, match=r"no adapter_model\.safetensors"):
        load(qv_copy, arch)
    torch.save(state, qv_copy / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="--allow-pickle"):
        load(qv_copy, arch)
    assert load(qv_copy, arch, allow_pickle=True).rank == 4


def test_rank_and_modules_beyond_the_pool(adapter_dir: AdapterDir, arch: ModelArch) -> None:
    with pytest.raises(AdapterLoadError, match=r"rank 16 exceeds .* raise --max-lora-rank"):
        load(adapter_dir("mlp_r16_patterns"), arch, max_rank=8)
    with pytest.raises(
        AdapterLoadError,
        match=r"targets gate_proj, up_proj, down_proj, .* raise --lora-target-modules",
    ):
        load(adapter_dir("mlp_r16_patterns"), arch, target_modules=("q_proj", "v_proj"))


def test_shapes_for_another_base(
    adapter_dir: AdapterDir, checkpoint_dir: Callable[[str], Path]
) -> None:
    qwen3 = read_arch(str(checkpoint_dir("qwen3")))  # q_proj is 128 wide there, 64 here
    with pytest.raises(AdapterLoadError, match="another base model"):
        load(adapter_dir("qv_r4"), qwen3)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", (64,), "DoRA"),
        ("base_model.model.model.embed_tokens.weight", (260, 64), "embedding weights"),
        ("base_model.model.lm_head.weight", (260, 64), "lm_head"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", (64,), "unexpected"),
        ("base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight", (4, 64), "layer 5"),
    ],
)
def test_tensor_refusals(
    qv_copy: Path, arch: ModelArch, name: str, shape: tuple[int, ...], message: str
) -> None:
    add_tensor(qv_copy, name, torch.zeros(shape))
    with pytest.raises(AdapterLoadError, match=message):
        load(qv_copy, arch)


def test_added_tokens_refused(qv_copy: Path, arch: ModelArch) -> None:
    (qv_copy / "added_tokens.json").write_text(json.dumps({"<tool>": 3}))
    load(qv_copy, arch)  # inside the base vocabulary: fine
    (qv_copy / "added_tokens.json").write_text(json.dumps({"<tool>": 256}))
    with pytest.raises(AdapterLoadError, match="adds tokens"):
        load(qv_copy, arch)


def test_missing_half_and_rank_mismatch(qv_copy: Path, arch: ModelArch) -> None:
    state = {k: v.clone() for k, v in load_file(str(qv_copy / WEIGHTS)).items()}
    key_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    save_file({k: v for k, v in state.items() if k != key_b}, str(qv_copy / WEIGHTS))
    with pytest.raises(AdapterLoadError, match="lacks lora_A or lora_B"):
        load(qv_copy, arch)
    save_file(state, str(qv_copy / WEIGHTS))
    edit_config(qv_copy, r=8)
    with pytest.raises(AdapterLoadError, match=r"has rank 4 but adapter_config\.json implies 8"):
        load(qv_copy, arch)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (None, ("q_proj", "v_proj")),
        ("all-linear", SUPPORTED_LORA_MODULES),
        (r".*\.(q_proj|v_proj)", ("q_proj", "v_proj")),
        (r"model\.layers\.7\.mlp\.down_proj", ("down_proj",)),
        (["self_attn.q_proj", "mlp.down_proj", "o_proj"], ("q_proj", "o_proj", "down_proj")),
    ],
)
def test_target_module_forms(target: object, expected: tuple[str, ...]) -> None:
    assert normalize_target_modules(target) == expected


def test_target_module_regex_matching_nothing() -> None:
    with pytest.raises(AdapterLoadError, match="matches none of the supported modules"):
        normalize_target_modules(r".*\.c_attn")
