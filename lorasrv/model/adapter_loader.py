"""PEFT adapter folder -> AdapterWeights, per fused module (host tensors), checked against the
base model; `lora_layout.pack_rows` then packs them into the row layout.

CPU only and thread-safe: called off the event loop; never touches the GPU or the row pool.
"""

from __future__ import annotations

import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lorasrv.config import SUPPORTED_LORA_MODULES
from lorasrv.model.adapter_checks import check_added_tokens, check_dtypes, check_packed
from lorasrv.model.arch import ModelArch
from lorasrv.model.lora_layout import (
    MODULE_SLICE,
    POOL_MODULES,
    AdapterWeights,
    LoraModuleWeights,
    pool_module_shapes,
)
from lorasrv.peft_config import AdapterLoadError, PeftConfig, lora_scaling, read_peft_config

_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module_key>model\.layers\.(?P<layer>\d+)\."
    r"(?:self_attn|mlp)\.(?P<name>\w+?))\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
# Substrings of tensor names that mean a feature we refuse, with the reason.
_REFUSED_KEYS = (
    ("lora_magnitude_vector", "DoRA magnitude vectors (use_dora) are not supported"),
    ("trainable_tokens", "added tokens (trainable_token_indices) are not supported"),
    ("embed_tokens", "embedding weights / added tokens are not supported"),
    ("lora_embedding", "embedding weights / added tokens are not supported"),
    ("lm_head", "lm_head weights are not supported"),
    ("modules_to_save", "modules_to_save weights are not supported"),
)
# (A, B, module_key) per (layer, PEFT module name)
_Pairs = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, str]]


def load_adapter(
    path: str,
    *,
    arch: ModelArch,
    max_rank: int,
    target_modules: tuple[str, ...],
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
) -> AdapterWeights:
    """Read and check one PEFT folder; AdapterLoadError says what is refused, which flag helps."""
    config = read_peft_config(path)
    check_added_tokens(path, arch.vocab_size)
    tensors = _read_tensors(path, allow_pickle)
    pairs = _collect_pairs(tensors, path, arch, target_modules)
    check_dtypes(tensors, path)
    rank = max(a.shape[0] for a, _, _ in pairs.values())
    if rank > max_rank:
        raise AdapterLoadError(
            f"adapter {path!r}: rank {rank} exceeds the pool's max LoRA rank {max_rank}; "
            "raise --max-lora-rank"
        )
    scaling = lora_scaling(config.lora_alpha, config.r, config.use_rslora)
    weights = AdapterWeights(
        rank=rank,
        scaling=scaling,
        modules=_pool_layout(pairs, config, arch, rank, scaling, dtype),
        target_modules=tuple(m for m in SUPPORTED_LORA_MODULES if any(m == n for _, n in pairs)),
        dtype=dtype,
    )
    check_packed(weights, path)
    return weights


def _read_tensors(path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    safetensors_file = os.path.join(path, "adapter_model.safetensors")
    pickle_file = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(safetensors_file):
        try:
            return load_file(safetensors_file, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterLoadError(
                f"adapter {path!r}: adapter_model.safetensors is corrupt or unreadable: {exc}"
            ) from None
    if os.path.isfile(pickle_file):
        if not allow_pickle:
            raise AdapterLoadError(
                f"adapter {path!r}: only a pickle adapter_model.bin; pickles are refused unless "
                "--allow-pickle is set (convert it to safetensors instead)"
            )
        try:
            state = torch.load(pickle_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types for a bad file
            raise AdapterLoadError(
                f"adapter {path!r}: unreadable adapter_model.bin: {exc}"
            ) from None
        if not isinstance(state, dict):
            raise AdapterLoadError(f"adapter {path!r}: adapter_model.bin is not a state dict")
        return state
    raise AdapterLoadError(f"adapter {path!r}: no adapter_model.safetensors in {path}")


def _collect_pairs(
    tensors: dict[str, torch.Tensor], path: str, arch: ModelArch, target_modules: tuple[str, ...]
) -> _Pairs:
    """Pair lora_A/lora_B per (layer, module), refusing anything else; shapes checked."""
    halves: dict[tuple[int, str, str], torch.Tensor] = {}
    keys: dict[tuple[int, str], str] = {}
    for key, tensor in tensors.items():
        for marker, why in _REFUSED_KEYS:
            if marker in key:
                raise AdapterLoadError(f"adapter {path!r}: {why} (tensor {key})")
        match = _KEY.match(key)
        if match is None:
            raise AdapterLoadError(f"adapter {path!r}: unexpected tensor {key}")
        layer, name = int(match["layer"]), match["name"]
        if name not in SUPPORTED_LORA_MODULES:
            raise AdapterLoadError(f"adapter {path!r}: LoRA on {name} is not supported ({key})")
        if layer >= arch.num_layers:
            raise AdapterLoadError(
                f"adapter {path!r}: {key} is for layer {layer}; the model has {arch.num_layers}"
            )
        halves[layer, name, match["ab"]] = tensor
        keys[layer, name] = match["module_key"]
    if not keys:
        raise AdapterLoadError(f"adapter {path!r}: no LoRA weights found")
    trained = {name for _, name in keys}
    outside = [m for m in SUPPORTED_LORA_MODULES if m in trained and m not in target_modules]
    if outside:
        raise AdapterLoadError(
            f"adapter {path!r}: targets {', '.join(outside)}, outside the pool's LoRA target "
            f"modules ({', '.join(target_modules) or 'none'}); raise --lora-target-modules"
        )
    shapes = pool_module_shapes(arch)
    pairs: _Pairs = {}
    for (layer, name), module_key in keys.items():
        a, b = halves.get((layer, name, "A")), halves.get((layer, name, "B"))
        if a is None or b is None:
            raise AdapterLoadError(f"adapter {path!r}: {module_key} lacks lora_A or lora_B")
        pool_module, j = MODULE_SLICE[name]
        in_features, out_features = (
            shapes[pool_module].in_features,
            shapes[pool_module].slice_sizes[j],
        )
        rank = a.shape[0]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterLoadError(
                f"adapter {path!r}: {module_key} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; the base model needs [r, {in_features}] and "
                f"[{out_features}, r]: was it trained for another base model?"
            )
        pairs[layer, name] = (a, b, module_key)
    return pairs


def _pool_layout(
    pairs: _Pairs,
    config: PeftConfig,
    arch: ModelArch,
    rank: int,
    scaling: float,
    dtype: torch.dtype,
) -> dict[tuple[int, str], LoraModuleWeights]:
    """Stack each (layer, pool module) into A `[slices*rank, in]`, B `[out, rank]`, views of one
    host buffer."""
    shapes = pool_module_shapes(arch)
    present = sorted({(layer, MODULE_SLICE[name][0]) for layer, name in pairs})
    sizes = [
        (shapes[m].num_slices * rank * shapes[m].in_features, shapes[m].out_features * rank)
        for _, m in present
    ]
    buffer = torch.zeros(sum(a + b for a, b in sizes), dtype=dtype)
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    offset = 0
    for (layer, pool_module), (a_numel, b_numel) in zip(present, sizes, strict=True):
        shape = shapes[pool_module]
        a_stack = buffer[offset : offset + a_numel].view(shape.num_slices * rank, -1)
        b_stack = buffer[offset + a_numel : offset + a_numel + b_numel].view(-1, rank)
        offset += a_numel + b_numel
        for j, name in enumerate(POOL_MODULES[pool_module]):
            if (layer, name) not in pairs:
                continue  # slice not covered: stays zero
            a, b, module_key = pairs[layer, name]
            module_rank = a.shape[0]
            if module_rank != config.rank_for(module_key):
                raise AdapterLoadError(
                    f"adapter {config.path!r}: {module_key} has rank {module_rank} but "
                    f"adapter_config.json implies {config.rank_for(module_key)}"
                )
            # The kernels apply one scaling per adapter; a module whose rank/alpha pattern gives
            # another scaling carries the ratio in B (computed in float32, then rounded once).
            ratio = config.scaling_for(module_key) / scaling
            lo, hi = shape.slice_offsets[j], shape.slice_offsets[j + 1]
            a_stack[j * rank : j * rank + module_rank].copy_(a)
            b_stack[lo:hi, :module_rank].copy_(b.float() * ratio if ratio != 1.0 else b)
        modules[layer, pool_module] = LoraModuleWeights(a=a_stack, b=b_stack)
    return modules
