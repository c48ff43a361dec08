"""The embedded demo: a tiny Llama checkpoint, its BPE tokenizer and two PEFT LoRA adapters.

Built once, deterministically, into a cache folder; the model is trained for a few seconds on the
tokenizer's corpus (`demo_train.py`) so its text reads as words. Uses torch and tokenizers, never
transformers or peft.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Final, NamedTuple

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lorasrv import demo_train
from lorasrv.demo_corpus import CORPUS
from lorasrv.demo_tokenizer import BOS, EOS_TEXT, EOT, SPECIAL_TOKENS, build_tokenizer

DEMO_VERSION: Final = "demo-v2"  # v2: trained weights
#: training steps of the demo model (~15 s on one core); LORASRV_DEMO_TRAIN_STEPS overrides it
#: (tests take a few steps), and a demo of other steps is cached in a folder of its own
TRAIN_STEPS: Final = 120
TRAIN_STEPS_ENV: Final = "LORASRV_DEMO_TRAIN_STEPS"
MODEL_NAME: Final = "lorasrv-demo-llama"
VOCAB_SIZE: Final = 1024  # BPE vocabulary plus the special tokens
HIDDEN: Final = 128
NUM_LAYERS: Final = 4
NUM_HEADS: Final = 4
NUM_KV_HEADS: Final = 2
HEAD_DIM: Final = HIDDEN // NUM_HEADS
INTERMEDIATE: Final = 256
WEIGHT_STD: Final = 0.08
CHAT_TEMPLATE: Final = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# module -> (in_features, out_features)
MODULE_SHAPES: Final = {
    "q_proj": (HIDDEN, NUM_HEADS * HEAD_DIM),
    "k_proj": (HIDDEN, NUM_KV_HEADS * HEAD_DIM),
    "v_proj": (HIDDEN, NUM_KV_HEADS * HEAD_DIM),
    "o_proj": (NUM_HEADS * HEAD_DIM, HIDDEN),
    "gate_proj": (HIDDEN, INTERMEDIATE),
    "up_proj": (HIDDEN, INTERMEDIATE),
    "down_proj": (INTERMEDIATE, HIDDEN),
}
ATTN_MODULES: Final = ("q_proj", "k_proj", "v_proj", "o_proj")


class DemoAdapterSpec(NamedTuple):
    name: str
    rank: int
    alpha: int
    target_modules: tuple[str, ...]
    seed: int


DEMO_ADAPTERS: Final = (
    DemoAdapterSpec("demo-lora-a", 8, 16, ("q_proj", "v_proj"), seed=1),
    DemoAdapterSpec("demo-lora-b", 16, 32, tuple(MODULE_SHAPES), seed=2),
)
MODEL_FILES: Final = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
ADAPTER_FILES: Final = ("adapter_config.json", "adapter_model.safetensors")


class DemoModel(NamedTuple):
    model_path: str
    adapters: dict[str, str]  # adapter name -> PEFT folder


def ensure_demo_model(root: Path | None = None) -> DemoModel:
    """The demo under `root/demo-v2` (default root: $LORASRV_CACHE_DIR or ~/.cache/lorasrv).

    Built in a temporary folder and moved into place with one `os.replace`, so a reader never
    sees half a demo; a complete existing one is returned as is.
    """
    if root is None:
        root = Path(os.environ.get("LORASRV_CACHE_DIR") or Path.home() / ".cache" / "lorasrv")
    root = Path(root)
    steps = train_steps()
    target = root / (DEMO_VERSION if steps == TRAIN_STEPS else f"{DEMO_VERSION}-steps{steps}")
    if _is_complete(target):
        return _describe(target)
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}-", dir=root))
    building.chmod(0o755)  # mkdtemp's 0o700 would hide the demo from other users
    try:
        build_demo(building, steps)
        if target.exists() and not _is_complete(target):  # a damaged leftover
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(building, target)
        except OSError:
            if not _is_complete(target):  # not another process that finished first
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return _describe(target)


def train_steps() -> int:
    return int(os.environ.get(TRAIN_STEPS_ENV) or TRAIN_STEPS)


def build_demo(folder: Path, steps: int | None = None) -> None:
    """Write the demo model (`model/`, trained `steps`, default `train_steps()`) and adapters (one
    folder each) into `folder`."""
    model_dir = folder / "model"
    model_dir.mkdir(parents=True)
    tokenizer = build_tokenizer(VOCAB_SIZE)
    _write_tokenizer_files(model_dir, tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    bos_id = tokenizer.token_to_id(BOS)
    eos_ids = [tokenizer.token_to_id(EOS_TEXT), tokenizer.token_to_id(EOT)]
    _write_json(model_dir / "config.json", _model_config(vocab_size, bos_id, eos_ids))
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_ids, "do_sample": False}
    _write_json(model_dir / "generation_config.json", generation)
    weights = _base_weights(vocab_size)
    steps = train_steps() if steps is None else steps
    demo_train.train(weights, corpus_stream(tokenizer), SHAPE, steps)
    save_file(weights, model_dir / "model.safetensors", {"format": "pt"})
    for spec in DEMO_ADAPTERS:
        _write_adapter(folder / spec.name, spec)


def _write_tokenizer_files(folder: Path, tokenizer: Tokenizer) -> None:
    (folder / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOT})


# ----------------------------------------------------------------------------- model, adapters

SHAPE: Final = demo_train.Shape(NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)


def corpus_stream(tokenizer: Tokenizer) -> list[int]:
    """The corpus as training tokens: each paragraph opens with BOS and ends with EOS."""
    eos = tokenizer.token_to_id(EOS_TEXT)
    assert eos is not None  # a special token of build_tokenizer
    stream: list[int] = []
    for paragraph in CORPUS.split("\n\n"):
        stream += [*tokenizer.encode(paragraph.strip()).ids, eos]
    return stream


def _model_config(vocab_size: int, bos_id: int | None, eos_ids: list[int | None]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
    }


def _base_weights(vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * WEIGHT_STD

    weights = {"model.embed_tokens.weight": normal(vocab_size, HIDDEN)}
    for layer in range(NUM_LAYERS):
        prefix = f"model.layers.{layer}"
        for module, (in_features, out_features) in MODULE_SHAPES.items():
            group = "self_attn" if module in ATTN_MODULES else "mlp"
            weights[f"{prefix}.{group}.{module}.weight"] = normal(out_features, in_features)
        weights[f"{prefix}.input_layernorm.weight"] = torch.ones(HIDDEN)
        weights[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    weights["model.norm.weight"] = torch.ones(HIDDEN)
    weights["lm_head.weight"] = normal(vocab_size, HIDDEN)
    return weights


def _write_adapter(folder: Path, spec: DemoAdapterSpec) -> None:
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(spec.seed)
    weights: dict[str, torch.Tensor] = {}
    for layer in range(NUM_LAYERS):
        for module in spec.target_modules:
            in_features, out_features = MODULE_SHAPES[module]
            group = "self_attn" if module in ATTN_MODULES else "mlp"
            key = f"base_model.model.model.layers.{layer}.{group}.{module}"
            a = torch.randn(spec.rank, in_features, generator=generator) * 0.1  # [r, in]
            b = torch.randn(out_features, spec.rank, generator=generator) * 0.05  # [out, r]
            weights[f"{key}.lora_A.weight"] = a
            weights[f"{key}.lora_B.weight"] = b
    save_file(weights, folder / "adapter_model.safetensors", {"format": "pt"})
    _write_json(folder / "adapter_config.json", _adapter_config(spec))


def _adapter_config(spec: DemoAdapterSpec) -> dict[str, Any]:
    """adapter_config.json with the keys peft writes for a plain LoRA."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": MODEL_NAME,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_complete(folder: Path) -> bool:
    files = [folder / "model" / name for name in MODEL_FILES]
    files += [folder / spec.name / name for spec in DEMO_ADAPTERS for name in ADAPTER_FILES]
    return all(path.is_file() for path in files)


def _describe(folder: Path) -> DemoModel:
    adapters = {spec.name: str(folder / spec.name) for spec in DEMO_ADAPTERS}
    return DemoModel(model_path=str(folder / "model"), adapters=adapters)
