"""config.json -> ModelArch (rope scaling, refusals); checkpoint loading (shards, pickle)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lorasrv.model.arch import ModelArch, RopeScaling, parse_arch, read_arch
from lorasrv.model.layers import rope_inv_freq
from lorasrv.model.loader import load_model_weights
from tests.model.checkpoints import KINDS, build_checkpoint, tiny_model

CPU = torch.device("cpu")
LLAMA_3_1_8B: dict[str, Any] = {  # trimmed real config.json, transformers 4.x layout
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
    "eos_token_id": 128001,
}


def test_real_llama_config_old_layout() -> None:
    arch = parse_arch(LLAMA_3_1_8B, {"eos_token_id": [128001, 128008, 128009]})
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads) == (
        4096,
        32,
        32,
        8,
    )
    assert (arch.head_dim, arch.q_size, arch.kv_size) == (128, 4096, 1024)
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert arch.eos_token_ids == (128001, 128008, 128009)
    assert arch.torch_dtype == "bfloat16"
    assert not arch.qkv_bias
    assert not arch.o_bias
    assert not arch.qk_norm
    assert not arch.tie_word_embeddings


@pytest.mark.parametrize("kind", KINDS)
def test_saved_configs_parse_and_rope_matches_hf(kind: str, tmp_path: Path) -> None:
    model = tiny_model(kind)
    model.save_pretrained(tmp_path)
    arch = read_arch(str(tmp_path))
    assert arch.head_dim == (32 if kind == "qwen3" else 16)
    assert arch.qkv_bias == (kind == "qwen2")
    assert arch.qk_norm == (kind == "qwen3")
    assert arch.tie_word_embeddings == (kind == "llama_tied")
    assert arch.rope_theta == 500000.0
    torch.testing.assert_close(rope_inv_freq(arch), model.model.rotary_emb.inv_freq, rtol=0, atol=0)


def test_rope_parameters_new_layout() -> None:
    config = {**LLAMA_3_1_8B, "rope_scaling": None, "rope_theta": None}
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    arch = parse_arch(config)
    assert arch.rope_scaling == RopeScaling("linear", 2.0)
    assert arch.rope_theta == 1e6
    old = parse_arch({**LLAMA_3_1_8B, "rope_scaling": {"type": "linear", "factor": 3.0}})
    assert old.rope_scaling == RopeScaling("linear", 3.0)
    assert parse_arch({**LLAMA_3_1_8B, "rope_scaling": None}).rope_scaling is None


def test_qwen_and_mistral_specifics() -> None:
    qwen2 = parse_arch({**LLAMA_3_1_8B, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.qkv_bias
    assert not qwen2.o_bias
    qwen3 = parse_arch(
        {
            **LLAMA_3_1_8B,
            "architectures": ["Qwen3ForCausalLM"],
            "head_dim": 128,
            "hidden_size": 2560,
        }
    )
    assert qwen3.qk_norm
    assert qwen3.head_dim == 128
    assert not qwen3.qkv_bias
    mistral = parse_arch(
        {**LLAMA_3_1_8B, "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    )
    assert mistral.sliding_window == 4096
    qwen_window = {**LLAMA_3_1_8B, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096}
    assert parse_arch(qwen_window).sliding_window is None  # use_sliding_window is false


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"architectures": None, "model_type": "phi"}, "unsupported architecture"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
    ],
)
def test_refused_configs(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_arch({**LLAMA_3_1_8B, **change})


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        read_arch(str(tmp_path))


def _weights(model_dir: Path, arch: ModelArch, **kwargs: Any) -> dict[str, torch.Tensor]:
    return load_model_weights(str(model_dir), arch, dtype=torch.float32, device=CPU, **kwargs)


def test_sharded_equals_single_file(tmp_path: Path, checkpoint_dir: Callable[[str], Path]) -> None:
    single_dir = checkpoint_dir("qwen2")
    sharded_dir = build_checkpoint(tmp_path / "sharded", "qwen2", max_shard_size="40KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("*.safetensors"))) > 2
    arch = read_arch(str(single_dir))
    single, sharded = _weights(single_dir, arch), _weights(sharded_dir, arch)
    assert single.keys() == sharded.keys()
    assert "layers.1.qkv_proj.bias" in single
    for name, tensor in single.items():
        assert torch.equal(tensor, sharded[name]), name


def test_fused_layout(checkpoint_dir: Callable[[str], Path]) -> None:
    from safetensors.torch import load_file

    model_dir = checkpoint_dir("llama")
    arch = read_arch(str(model_dir))
    weights = _weights(model_dir, arch)
    raw = load_file(str(model_dir / "model.safetensors"))
    qkv = weights["layers.0.qkv_proj.weight"]  # [q + k + v, hidden]
    assert torch.equal(qkv[: arch.q_size], raw["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(qkv[-arch.kv_size :], raw["model.layers.0.self_attn.v_proj.weight"])
    gate_up = weights["layers.1.gate_up_proj.weight"]
    assert torch.equal(gate_up[arch.intermediate_size :], raw["model.layers.1.mlp.up_proj.weight"])
    half = load_model_weights(str(model_dir), arch, dtype=torch.bfloat16, device=CPU)
    assert half["embed_tokens.weight"].dtype == torch.bfloat16


def test_pickle_refused_unless_allowed(
    tmp_path: Path, checkpoint_dir: Callable[[str], Path]
) -> None:
    from safetensors.torch import load_file

    source = checkpoint_dir("llama")
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    torch.save(load_file(str(source / "model.safetensors")), tmp_path / "pytorch_model.bin")
    arch = read_arch(str(tmp_path))
    with pytest.raises(ValueError, match="allow_pickle"):
        _weights(tmp_path, arch)
    loaded = _weights(tmp_path, arch, allow_pickle=True)
    assert torch.equal(loaded["norm.weight"], _weights(source, arch)["norm.weight"])


def test_missing_tensor_and_bad_shape(
    tmp_path: Path, checkpoint_dir: Callable[[str], Path]
) -> None:
    from safetensors.torch import load_file, save_file

    source = checkpoint_dir("llama")
    arch = read_arch(str(source))
    state = {k: v.clone() for k, v in load_file(str(source / "model.safetensors")).items()}
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    save_file(
        {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k},
        tmp_path / "model.safetensors",
    )
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        _weights(tmp_path, arch)
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"norm\.weight has shape"):
        _weights(tmp_path, arch)
