"""Hugging Face `config.json` (+ `generation_config.json`) -> ModelArch, the facts the model needs.

Refuses architectures and options the Llama-family decoder does not implement; never guesses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


@dataclass(frozen=True, slots=True)
class RopeScaling:
    rope_type: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True, slots=True)
class ModelArch:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always; Llama/Qwen3 with attention_bias
    o_bias: bool  # Llama/Qwen3 with attention_bias (Qwen2 never)
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before rotary
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None  # the checkpoint's dtype name, e.g. "bfloat16"
    sliding_window: int | None  # Mistral v0.1-style; the runner caps the context to it

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def read_arch(model_dir: str) -> ModelArch:
    """Parse `model_dir/config.json` and, when present, `generation_config.json`."""
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{model_dir}: no config.json; not a Hugging Face model folder")
    with open(config_file) as f:
        config = json.load(f)
    generation: dict[str, Any] = {}
    generation_file = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(generation_file):
        with open(generation_file) as f:
            generation = json.load(f)
    return parse_arch(config, generation)


def parse_arch(config: Mapping[str, Any], generation: Mapping[str, Any] | None = None) -> ModelArch:
    """One decoded config.json -> ModelArch; ValueError naming the unsupported field."""
    architectures = config.get("architectures") or []
    architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if architecture is None:
        raise ValueError(
            f"unsupported architecture {architectures or config.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported; only silu")
    if config.get("mlp_bias"):
        raise ValueError("mlp_bias: true is not supported")
    hidden = int(config["hidden_size"])
    num_heads = int(config["num_attention_heads"])
    attention_bias = bool(config.get("attention_bias", False))
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    rope_params = _rope_parameters(config)
    return ModelArch(
        architecture=architecture,
        hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        intermediate_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_params.get("rope_theta") or config.get("rope_theta") or 10000.0),
        rope_scaling=_rope_scaling(rope_params, config),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=attention_bias and not is_qwen2,
        qk_norm=architecture == "Qwen3ForCausalLM",
        eos_token_ids=_eos_ids(config, generation or {}),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        sliding_window=_sliding_window(architecture, config),
    )


def _rope_parameters(config: Mapping[str, Any]) -> Mapping[str, Any]:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x `rope_scaling` + `rope_theta`.
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"rope_parameters must be an object, got {params!r}")
    if "full_attention" in params:  # per-layer-type parameters; all our layers are full attention
        params = params["full_attention"]
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    return params


def _rope_scaling(params: Mapping[str, Any], config: Mapping[str, Any]) -> RopeScaling | None:
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return RopeScaling("linear", float(params["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            float(params["factor"]),
            float(params.get("low_freq_factor", 1.0)),
            float(params.get("high_freq_factor", 4.0)),
            int(
                params.get("original_max_position_embeddings")
                or config.get("max_position_embeddings", 8192)
            ),
        )
    raise ValueError(
        f"rope scaling type {rope_type!r} is not supported; supported: none, linear, llama3"
    )


def _eos_ids(config: Mapping[str, Any], generation: Mapping[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (config, generation):
        value = source.get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


def _sliding_window(architecture: str, config: Mapping[str, Any]) -> int | None:
    window = config.get("sliding_window")
    if window is None:
        return None
    # Qwen2/Qwen3 carry a sliding_window value that only applies with use_sliding_window.
    if architecture != "MistralForCausalLM" and not config.get("use_sliding_window", False):
        return None
    return int(window)
