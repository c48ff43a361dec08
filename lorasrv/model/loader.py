"""Checkpoint files -> tensors: base weights (q/k/v and gate/up fused at load) and PEFT adapters.

Reads safetensors; pickle `.bin` files only with allow_pickle (then weights_only). Runs no code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from lorasrv.model.adapter_loader import load_adapter
from lorasrv.model.arch import ModelArch
from lorasrv.model.lora_layout import AdapterWeights

__all__ = [
    "AdapterWeights",
    "TensorFiles",
    "checked_weight_plan",
    "load_adapter",
    "load_model_weights",
    "weight_plan",
]

logger = logging.getLogger(__name__)

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PICKLE_INDEX = "pytorch_model.bin.index.json"


class TensorFiles:
    """name -> tensor over one checkpoint (single file or shards), read lazily per tensor."""

    def __init__(self, files: list[str], *, allow_pickle: bool = False) -> None:
        self._stack = ExitStack()
        self._where: dict[str, object] = {}  # name -> safe_open handle or loaded pickle dict
        for file in files:
            if file.endswith(".safetensors"):
                try:
                    handle = self._stack.enter_context(safe_open(file, framework="pt"))
                except (SafetensorError, OSError) as exc:
                    self.close()
                    raise ValueError(f"{file}: not a readable safetensors file: {exc}") from None
                self._where.update(dict.fromkeys(handle.keys(), handle))
            elif allow_pickle:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                self._where.update(dict.fromkeys(state.keys(), state))
            else:
                self.close()
                raise ValueError(
                    f"{file}: pickle checkpoints are refused; convert to safetensors or pass "
                    "allow_pickle (--allow-pickle) to load it with torch.load(weights_only=True)"
                )

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        source = self._where[name]
        if isinstance(source, dict):
            tensor: torch.Tensor = source[name]
            return tensor
        return source.get_tensor(name)  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        self._stack.close()
        self._where.clear()


def checkpoint_files(model_dir: str, *, allow_pickle: bool) -> list[str]:
    """The weight files of a HF model folder: safetensors index/single file, else pickles."""
    for index_name, single in (
        (_SAFETENSORS_INDEX, "model.safetensors"),
        (_PICKLE_INDEX, "pytorch_model.bin"),
    ):
        index_file = os.path.join(model_dir, index_name)
        if os.path.isfile(index_file):
            with open(index_file) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            return [os.path.join(model_dir, name) for name in files]
        if os.path.isfile(os.path.join(model_dir, single)):
            return [os.path.join(model_dir, single)]
    # Unusual names (e.g. consolidated.safetensors) still count when they are the only weights.
    found = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if found:
        return [os.path.join(model_dir, name) for name in found]
    if any(n.endswith(".bin") for n in os.listdir(model_dir)) and not allow_pickle:
        raise ValueError(
            f"{model_dir}: only pickle (.bin) weights found; they are refused unless "
            "allow_pickle (--allow-pickle) is set"
        )
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or shard index found")


def checked_weight_plan(
    files: TensorFiles, arch: ModelArch, model_dir: str
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """`weight_plan(arch)`, after checking that `files` hold every tensor it names."""
    plan = weight_plan(arch)
    missing = [n for sources, _ in plan.values() for n in sources if n not in files]
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensors: {missing[:5]}")
    return plan


def weight_plan(arch: ModelArch) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Our parameter name -> (HF names concatenated along dim 0, expected shape)."""
    hidden, inter, head_dim = arch.hidden_size, arch.intermediate_size, arch.head_dim
    qkv_out = arch.q_size + 2 * arch.kv_size
    plan: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
        "embed_tokens.weight": (("model.embed_tokens.weight",), (arch.vocab_size, hidden)),
        "norm.weight": (("model.norm.weight",), (hidden,)),
    }
    if not arch.tie_word_embeddings:
        plan["lm_head.weight"] = (("lm_head.weight",), (arch.vocab_size, hidden))
    for i in range(arch.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = tuple(f"{hf}self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))
        plan[ours + "input_layernorm.weight"] = ((hf + "input_layernorm.weight",), (hidden,))
        plan[ours + "qkv_proj.weight"] = (tuple(f"{n}.weight" for n in attn), (qkv_out, hidden))
        if arch.qkv_bias:
            plan[ours + "qkv_proj.bias"] = (tuple(f"{n}.bias" for n in attn), (qkv_out,))
        plan[ours + "o_proj.weight"] = ((hf + "self_attn.o_proj.weight",), (hidden, arch.q_size))
        if arch.o_bias:
            plan[ours + "o_proj.bias"] = ((hf + "self_attn.o_proj.bias",), (hidden,))
        if arch.qk_norm:
            plan[ours + "q_norm.weight"] = ((hf + "self_attn.q_norm.weight",), (head_dim,))
            plan[ours + "k_norm.weight"] = ((hf + "self_attn.k_norm.weight",), (head_dim,))
        plan[ours + "post_attention_layernorm.weight"] = (
            (hf + "post_attention_layernorm.weight",),
            (hidden,),
        )
        gate_up = (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")
        plan[ours + "gate_up_proj.weight"] = (gate_up, (2 * inter, hidden))
        plan[ours + "down_proj.weight"] = ((hf + "mlp.down_proj.weight",), (hidden, inter))
    return plan


def load_model_weights(
    model_dir: str,
    arch: ModelArch,
    *,
    dtype: torch.dtype,
    device: torch.device,
    allow_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """Every parameter of the decoder, in our names, fused, converted and on `device`."""
    files = TensorFiles(
        checkpoint_files(model_dir, allow_pickle=allow_pickle), allow_pickle=allow_pickle
    )
    try:
        plan = checked_weight_plan(files, arch, model_dir)
        weights: dict[str, torch.Tensor] = {}
        # A progress bar on a terminal only (stderr), so logs and tests stay clean.
        progress = tqdm(
            plan.items(), desc="Loading weights", unit="tensor", disable=not sys.stderr.isatty()
        )
        for name, (sources, shape) in progress:
            # Convert each part on its way to the device, so host memory holds one tensor at a time.
            # copy=True: on CPU a same-dtype `.to` would keep a view of the memory-mapped file.
            parts = [files.get(n).to(device=device, dtype=dtype, copy=True) for n in sources]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{model_dir}: {name} has shape {tuple(tensor.shape)}, config implies {shape}"
                )
            weights[name] = tensor
        used = {n for sources, _ in plan.values() for n in sources}
        ignored = [n for n in files.names() if n not in used and not n.endswith("inv_freq")]
        if ignored:
            logger.info(
                "%s: ignoring %d unused tensors, e.g. %s", model_dir, len(ignored), ignored[0]
            )
        return weights
    finally:
        files.close()
