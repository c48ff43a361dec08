"""Read and check a PEFT LoRA `adapter_config.json`: what lorasrv serves, or a clear refusal.

Pure: stdlib, msgspec and huggingface_hub only, no torch (the engine imports it too).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import msgspec

from lorasrv.config import SUPPORTED_LORA_MODULES
from lorasrv.hub import resolve_path
from lorasrv.safe_regex import regex_problem

ADAPTER_CONFIG = "adapter_config.json"
# What a Hub download fetches: no optimizer states or training checkpoints an adapter repo holds.
_ADAPTER_FILES = ["*.json", "adapter_model.safetensors", "adapter_model.bin"]
_EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")
# Module keys as PEFT sees them in a LlamaForCausalLM, to expand a regex target_modules; several
# layers, since a regex may pick some layers only (the loader then finds weights for those).
_ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
_PROBE_KEYS = {
    name: [
        f"model.layers.{i}.{'self_attn' if name in _ATTENTION_MODULES else 'mlp'}.{name}"
        for i in range(256)
    ]
    for name in SUPPORTED_LORA_MODULES
}
_EMBEDDING_KEYS = ("model.embed_tokens", "lm_head")
# PEFT LoRA variants whose forward differs from `y += s * B A x`; refused when set.
_VARIANTS = {
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "layer_replication": "layer_replication",
}


# The kernels keep each slot's scaling in float32 and its rank in int32.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32
INT32_MAX = 2**31 - 1
# Entries of rank_pattern / alpha_pattern: every module key is matched against each.
MAX_PATTERNS = 2048


class AdapterLoadError(ValueError):
    """Refused adapter; message says what is wrong and which flag to raise."""


class AdapterNotFoundError(AdapterLoadError, FileNotFoundError):
    """No adapter there: no such folder or Hub id, or a folder without adapter_config.json.
    A FileNotFoundError too, so callers that know nothing of PEFT can tell it from a refusal."""


_Refuse = Callable[[str], AdapterLoadError]


class PeftConfig(NamedTuple):
    path: str  # resolved local folder
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # SUPPORTED_LORA_MODULES names, in that order
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    max_rank: int  # max of r and rank_pattern values

    def rank_for(self, module_key: str) -> int:
        """Rank of one module, e.g. `model.layers.3.self_attn.q_proj`, by PEFT's pattern rules."""
        key = pattern_key(self.rank_pattern, module_key)
        return self.rank_pattern[key] if key is not None else self.r

    def scaling_for(self, module_key: str) -> float:
        """`alpha / r` (rsLoRA: `alpha / sqrt(r)`) for one module, patterns applied."""
        key = pattern_key(self.alpha_pattern, module_key)
        alpha = self.alpha_pattern[key] if key is not None else self.lora_alpha
        return lora_scaling(alpha, self.rank_for(module_key), self.use_rslora)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_key(patterns: Iterable[str], module_key: str) -> str | None:
    """The first pattern matching the key's suffix (PEFT's `get_pattern_key`), else None."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_key):
            return pattern
    return None


def read_peft_config(path_or_id: str, *, revision: str | None = None) -> PeftConfig:
    """Resolve an adapter folder (or Hub id) and parse its config; AdapterLoadError if refused."""
    try:
        path = resolve_path(path_or_id, revision=revision, allow_patterns=_ADAPTER_FILES)
    except FileNotFoundError as exc:
        raise AdapterNotFoundError(f"adapter {exc}") from None  # exc names the path
    config_file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        raise AdapterNotFoundError(
            f"adapter {path_or_id!r}: no {ADAPTER_CONFIG}; not a PEFT adapter folder"
        )
    try:
        with open(config_file, "rb") as f:
            raw = msgspec.json.decode(f.read())
    except (OSError, msgspec.DecodeError) as exc:
        raise AdapterLoadError(f"adapter {path_or_id!r}: invalid {ADAPTER_CONFIG}: {exc}") from None
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"adapter {path_or_id!r}: {ADAPTER_CONFIG} is not a JSON object")
    return parse_peft_config(raw, path=path, name=path_or_id)


def parse_peft_config(raw: Mapping[str, Any], *, path: str, name: str) -> PeftConfig:
    """Check one decoded adapter_config.json; every refusal names the problem."""

    def refuse(why: str) -> AdapterLoadError:
        return AdapterLoadError(f"adapter {name!r}: {why}")

    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise refuse(f"peft_type {raw.get('peft_type')!r} is not supported; only LORA adapters")
    if raw.get("use_dora"):
        raise refuse("DoRA adapters (use_dora: true) are not supported")
    if raw.get("modules_to_save"):
        raise refuse(
            f"modules_to_save {raw['modules_to_save']} is not supported: an adapter may only "
            "add LoRA deltas, not replace whole modules"
        )
    if raw.get("layers_to_transform") is not None:
        raise refuse("layers_to_transform is not supported (LoRA on a subset of layers)")
    if raw.get("bias", "none") != "none":
        raise refuse(f"bias {raw['bias']!r} is not supported; only bias 'none'")
    if raw.get("lora_bias"):
        raise refuse("lora_bias: true (a trained bias on lora_B) is not supported")
    if raw.get("fan_in_fan_out"):
        raise refuse("fan_in_fan_out: true (Conv1D layers) is not supported")
    if raw.get("trainable_token_indices"):
        raise refuse("added/trainable tokens (trainable_token_indices) are not supported")
    if raw.get("target_parameters"):
        raise refuse(
            "target_parameters (LoRA on raw parameters, e.g. MoE experts) is not supported"
        )
    for option, what in _VARIANTS.items():
        if raw.get(option):
            raise refuse(f"{what} is not supported; only plain LoRA")
    r = _positive_int(raw.get("r"), "r", refuse)
    rank_pattern = {
        _pattern(k, "rank_pattern", refuse): _positive_int(v, f"rank_pattern[{k!r}]", refuse)
        for k, v in _mapping(raw.get("rank_pattern"), "rank_pattern", refuse).items()
    }
    alpha_pattern = {
        _pattern(k, "alpha_pattern", refuse): _number(v, f"alpha_pattern[{k!r}]", refuse)
        for k, v in _mapping(raw.get("alpha_pattern"), "alpha_pattern", refuse).items()
    }
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise refuse(f"use_rslora must be true or false, got {use_rslora!r}")
    config = PeftConfig(
        path=path,
        r=r,
        lora_alpha=_number(raw.get("lora_alpha", 8), "lora_alpha", refuse),
        use_rslora=use_rslora,
        target_modules=normalize_target_modules(raw.get("target_modules"), refuse),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        max_rank=max([r, *rank_pattern.values()]),
    )
    check_scalings(config, refuse)
    return config


def check_scalings(config: PeftConfig, refuse: _Refuse = AdapterLoadError) -> None:
    """Every scaling a module can get, and its ratio to the slot's (folded into B), must be a
    float32 number; the slot's own must also be non-zero (the ratios divide by it)."""
    if config.lora_alpha == 0:
        raise refuse("lora_alpha must not be 0 (the adapter would change nothing)")
    base = lora_scaling(config.lora_alpha, config.r, config.use_rslora)
    if not FLOAT32_TINY <= abs(base) <= FLOAT32_MAX:
        raise refuse(
            f"lora_alpha {config.lora_alpha:g} with r {config.r} gives the scaling {base:g}, "
            "not representable in float32"
        )
    # distinct values only, each with the first field that holds it
    alphas = {v: f"alpha_pattern[{k!r}]" for k, v in reversed(config.alpha_pattern.items())}
    alphas[config.lora_alpha] = "lora_alpha"
    ranks = {v: f"rank_pattern[{k!r}]" for k, v in reversed(config.rank_pattern.items())}
    ranks[config.r] = "r"
    for alpha, alpha_field in alphas.items():
        for rank, rank_field in ranks.items():
            scaling = lora_scaling(alpha, rank, config.use_rslora)
            if not abs(scaling / base) <= FLOAT32_MAX:
                raise refuse(
                    f"{alpha_field} = {alpha:g} with {rank_field} = {rank} gives the scaling "
                    f"{scaling:g}, {scaling / base:g} times the adapter's: not representable "
                    "in float32"
                )


def normalize_target_modules(target: object, refuse: _Refuse = AdapterLoadError) -> tuple[str, ...]:
    """PEFT's `target_modules` (list of names/suffixes, regex string, all-linear) -> our names."""
    if target is None:
        return ("q_proj", "v_proj")  # PEFT's default for the Llama family
    if target == "all-linear":
        return SUPPORTED_LORA_MODULES
    if isinstance(target, str):
        _pattern(target, "target_modules", refuse)
        if any(re.fullmatch(target, key) for key in _EMBEDDING_KEYS):
            raise refuse(f"target_modules {target!r} matches embedding/lm_head; not supported")
        found = {
            name for name, keys in _PROBE_KEYS.items() if any(re.fullmatch(target, k) for k in keys)
        }
        if not found:
            raise refuse(
                f"target_modules regex {target!r} matches none of the supported modules "
                f"({', '.join(SUPPORTED_LORA_MODULES)})"
            )
        return tuple(m for m in SUPPORTED_LORA_MODULES if m in found)
    if not isinstance(target, list | tuple) or not all(isinstance(t, str) for t in target):
        raise refuse(f"target_modules must be a list of names or a string, got {target!r}")
    if not target:
        raise refuse("target_modules is empty: the adapter would change nothing")
    names = {t.rsplit(".", 1)[-1] for t in target}
    embedding = sorted(names & set(_EMBEDDING_MODULES))
    if embedding:
        raise refuse(f"target_modules {embedding}: LoRA on embeddings/lm_head is not supported")
    unknown = sorted(names - set(SUPPORTED_LORA_MODULES))
    if unknown:
        raise refuse(
            f"target_modules {unknown} are not supported; supported: "
            f"{', '.join(SUPPORTED_LORA_MODULES)}"
        )
    return tuple(m for m in SUPPORTED_LORA_MODULES if m in names)


def _mapping(value: object, field: str, refuse: _Refuse) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise refuse(f"{field} must be an object, got {value!r:.80}")
    if len(value) > MAX_PATTERNS:
        raise refuse(f"{field} has {len(value)} entries; at most {MAX_PATTERNS}")
    return value


def _pattern(key: object, field: str, refuse: _Refuse) -> str:
    key = str(key)
    problem = regex_problem(key)
    if problem is not None:
        raise refuse(f"{field} pattern {key[:80]!r}: {problem}")
    return key


def _positive_int(value: object, field: str, refuse: _Refuse) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT32_MAX:
        raise refuse(f"{field} must be a positive integer up to {INT32_MAX}, got {value!r:.80}")
    return value


def _number(value: object, field: str, refuse: _Refuse) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise refuse(f"{field} must be a number, got {value!r:.80}")
    if isinstance(value, int) and abs(value) > FLOAT32_MAX:
        raise refuse(f"{field} is too large: not representable in float32")
    number = float(value)
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise refuse(f"{field} {number:g} is not representable in float32 (finite, <= 3.4e38)")
    return number
