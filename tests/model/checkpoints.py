"""Tiny random Hugging Face checkpoints and PEFT adapters for tests, built locally (no downloads).

Importable from any test directory: `from tests.model.checkpoints import build_checkpoint`.
Weights are seeded and large enough (std 0.2) that greedy picks are far from ties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The real model's value is in each comment (Llama-3-8B unless noted).
TINY_LLAMA: dict[str, Any] = {
    "hidden_size": 64,  # 4096
    "num_hidden_layers": 2,  # 32
    "num_attention_heads": 4,  # 32
    "num_key_value_heads": 2,  # 8
    "intermediate_size": 128,  # 14336
    "vocab_size": 256,  # 128256
    "max_position_embeddings": 256,  # 8192
    "rms_norm_eps": 1e-5,  # 1e-5
    "rope_theta": 500000.0,  # 500000.0
    "tie_word_embeddings": False,  # False (Llama-3.2-1B: True)
    "initializer_range": 0.2,  # 0.02; larger here so logits are well separated
    "bos_token_id": 1,  # 128000
    "eos_token_id": 2,  # 128001
}

KINDS = ("llama", "llama_tied", "llama3_rope", "linear_rope", "qwen2", "qwen3", "mistral")


def tiny_config(kind: str = "llama", **overrides: Any) -> Any:
    """A transformers config of the given kind, tiny; `overrides` win."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    fields = dict(TINY_LLAMA)
    if kind == "llama_tied":
        fields["tie_word_embeddings"] = True
    elif kind == "llama3_rope":
        # Llama-3.1-8B: factor 8, low 1, high 4, original 8192; a short original length here
        # so the scaled band covers frequencies that matter at test positions.
        fields["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    elif kind == "linear_rope":
        fields["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    fields.update(overrides)
    if kind == "qwen2":  # q/k/v bias
        return Qwen2Config(**fields)
    if kind == "qwen3":  # qk norm; head_dim 32 makes q_size (128) != hidden (64), as in Qwen3-8B
        return Qwen3Config(**{"head_dim": 32, **fields})
    if kind == "mistral":
        return MistralConfig(**{"sliding_window": 4096, **fields})
    if kind in ("llama", "llama_tied", "llama3_rope", "linear_rope"):
        return LlamaConfig(**fields)
    raise ValueError(f"unknown checkpoint kind {kind!r}")


def tiny_model(kind: str = "llama", *, seed: int = 0, **overrides: Any) -> Any:
    """A random-init causal LM in eval mode; norms and biases randomized too (HF inits them 1/0)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    return model.eval()


def build_checkpoint(
    out_dir: str | Path,
    kind: str = "llama",
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny model (safetensors, float32) with config and generation config."""
    out = Path(out_dir)
    model = tiny_model(kind, seed=seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def build_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int,
    target_modules: list[str] | str,
    lora_alpha: float = 16,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    seed: int = 0,
) -> Path:
    """A PEFT LoRA adapter for the checkpoint in base_dir, with non-zero B.

    NOTE: `init_lora_weights=False` is what makes the test meaningful: PEFT's default makes
    B zero, so the adapter would equal the base model.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    get_peft_model(base, config).save_pretrained(out_dir)
    return Path(out_dir)


# name -> build_adapter keywords; the sets the tests mix in one batch
ADAPTERS: dict[str, dict[str, Any]] = {
    "qv_r4": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "seed": 1},
    "all_r8_rslora": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": "all-linear",
        "use_rslora": True,
        "seed": 2,
    },
    "mlp_r16_patterns": {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {"layers.1.mlp.up_proj": 4, "down_proj": 8},
        "alpha_pattern": {"gate_proj": 8},
        "seed": 3,
    },
    "all_r16": {"r": 16, "lora_alpha": 16, "target_modules": "all-linear", "seed": 4},
}
