"""The flag table: every setting's flag, one-line help, default and vLLM alias, derived from the
config Structs so flags never drift. The one place flags are declared; `cli.py` parses with it.
"""

from __future__ import annotations

import argparse
import types
from typing import Any, Final, Literal, Union, get_args, get_origin, get_type_hints

import msgspec

from lorasrv import __version__
from lorasrv.config import (
    AdapterConfig,
    CacheConfig,
    HttpConfig,
    ModelConfig,
    SchedulerConfig,
)

ENV_PREFIX: Final = "LORASRV_"
SECTIONS: Final[tuple[tuple[str, type[msgspec.Struct]], ...]] = (
    ("model", ModelConfig),
    ("cache", CacheConfig),
    ("scheduler", SchedulerConfig),
    ("adapters", AdapterConfig),
    ("http", HttpConfig),
)

#: setting -> its one-line help. Every config field has one (tests/unit/test_cli.py checks).
HELP: Final[dict[str, str]] = {
    "model_path": "local Hugging Face folder or Hub id of the base model",
    "served_model_name": "the base model's name in the API (`model` field, /v1/models)",
    "tokenizer_path": "tokenizer folder or Hub id, if not the model's",
    "revision": "Hub branch, tag or commit of --model-path",
    "dtype": "weights and activations; auto: the checkpoint's half dtype on CUDA, float32 on CPU",
    "device": "where the model runs; auto: CUDA when available",
    "context_length": "longest prompt + output in tokens",
    "tp_size": "tensor parallelism: GPUs (CPU processes in tests) that run one model",
    "seed": "base seed of sampling",
    "disable_cuda_graph": "run decode steps eagerly instead of replaying CUDA graphs",
    "allow_pickle": "allow pickle (.bin) checkpoints; they can run code when loaded",
    "page_size": "tokens per KV cache page",
    "mem_fraction_static": "CUDA: share of free GPU memory for weights, adapters and KV cache",
    "kv_cache_bytes": "KV cache budget in bytes",
    "num_kv_pages": "KV cache pages, overriding the budget",
    "max_running_requests": "rows in the running batch at most",
    "chunked_prefill_size": "token budget of one step; longer prompts prefill in chunks",
    "max_queued_requests": "requests waiting for admission at most; beyond it: 503",
    "enable_mixed_chunk": "let prefill chunks ride along decode steps",
    "disable_overlap_schedule": "wait for each step's tokens before launching the next step",
    "disable_radix_cache": "no prefix cache: compute every prompt from its first token instead "
    "of reusing the KV of a prefix cached under the same adapter version",
    "enable_lora": "serve adapters (implied by --lora-paths)",
    "lora_paths": "adapters to register at start: PATH | NAME=PATH | "
    '{"lora_name": ..., "lora_path": ..., "pinned": ...}',
    "max_loras_per_batch": "distinct adapters in one batch at most",
    "max_loaded_loras": "adapters kept in host memory at most; others reload on demand",
    "lora_backend": "LoRA ops; auto: triton on CUDA, torch elsewhere",
    "max_lora_rank": "largest adapter rank the GPU pool holds",
    "lora_target_modules": "modules adapters may target, or 'all'",
    "lora_eviction_policy": "which idle adapter leaves its GPU slot first",
    "host": "address to listen on",
    "port": "port to listen on (0: any free port)",
    "api_key": f"require 'Authorization: Bearer KEY' ({ENV_PREFIX}API_KEY keeps it out of ps)",
    "admin_api_key": "key for the adapter load/unload routes",
    "log_level": "log verbosity; debug also prints tracebacks of startup errors",
    "log_stats_interval": "seconds between stats log lines while serving; 0: none",
    "graceful_shutdown_timeout": "at SIGTERM/SIGINT, seconds requests in flight get to finish; "
    "then (or at a second signal) they end with an error",
}

#: what a setting whose default is None means
NONE_MEANS: Final[dict[str, str]] = {
    "model_path": "the embedded demo model",
    "served_model_name": "the model path; lorasrv-demo for the demo",
    "tokenizer_path": "--model-path",
    "revision": "the Hub's default branch",
    "context_length": "the model's max_position_embeddings",
    "kv_cache_bytes": "from --mem-fraction-static on CUDA, 256 MiB on CPU",
    "num_kv_pages": "from the KV budget",
    "max_loaded_loras": "no cap",
    "max_loras_per_batch": "as many as adapter memory holds",
    "max_lora_rank": "the largest rank in --lora-paths",
    "lora_target_modules": "the union over --lora-paths",
    "api_key": "no key",
    "admin_api_key": "--api-key",
}

#: vLLM's flag names (typed out of habit) -> the setting each sets. `--served-model-name` and
#: `--max-lora-rank` are already the same in both.
VLLM_ALIASES: Final[dict[str, str]] = {
    "--model": "model_path",
    "--tokenizer": "tokenizer_path",
    "--tensor-parallel-size": "tp_size",
    "-tp": "tp_size",
    "--max-model-len": "context_length",
    "--gpu-memory-utilization": "mem_fraction_static",
    "--enforce-eager": "disable_cuda_graph",
    "--max-num-seqs": "max_running_requests",
    "--max-num-batched-tokens": "chunked_prefill_size",
    "--lora-modules": "lora_paths",
    "--max-loras": "max_loras_per_batch",
    "--max-cpu-loras": "max_loaded_loras",
}


def flag_of(name: str) -> str:
    """The flag of a setting: `max_loras_per_batch` -> `--max-loras-per-batch`."""
    return "--" + name.replace("_", "-")


def option_types() -> dict[str, Any]:
    """Flat option name -> its annotated type (Annotated kept, so constraints still apply)."""
    return {
        name: hint
        for _, cls in SECTIONS
        for name, hint in get_type_hints(cls, include_extras=True).items()
    }


def plain_type(hint: Any) -> Any:
    """Strip Annotated and `| None`: the value type a flag converts to."""
    while get_origin(hint) is not None and hasattr(hint, "__metadata__"):
        hint = get_args(hint)[0]
    if get_origin(hint) in (Union, types.UnionType):
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(members) == 1:
            return plain_type(members[0])
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorasrv",
        description="Multi-LoRA LLM inference server: one base model, many LoRA adapters in one "
        "batch. SGLang's flag names; vLLM's names for the same settings are accepted too.",
        epilog=f"Every flag can also be set as {ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}API_KEY) "
        "or in the TOML file; precedence: file < environment < flags.",
    )
    parser.add_argument("--version", action="version", version=f"lorasrv {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML file with the settings")
    aliases: dict[str, list[str]] = {}
    for alias, name in VLLM_ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    for section, cls in SECTIONS:
        group = parser.add_argument_group(section)
        defaults = cls()
        for name, hint in get_type_hints(cls, include_extras=True).items():
            flags = [flag_of(name), *aliases.get(name, ())]
            # NOTE: a new setting needs a HELP entry (and NONE_MEANS when its default is None);
            # tests/unit/test_cli_flags.py fails without them, the parser does not
            default = _default_text(name, getattr(defaults, name))
            help_text = f"{HELP.get(name, name.replace('_', ' '))} (default: {default})"
            _add_flag(group, flags, name, plain_type(hint), help_text)
    group = parser.add_argument_group("vLLM")
    group.add_argument(
        "--disable-log-stats",
        dest="log_stats_interval",
        action="store_const",
        const=0.0,
        help="no stats log lines (same as --log-stats-interval 0)",
    )
    return parser


def _default_text(name: str, default: Any) -> str:
    if default is None:
        return NONE_MEANS.get(name, "none")
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return " ".join(map(str, default)) or "none"
    return str(default)


def _add_flag(
    group: argparse._ArgumentGroup, flags: list[str], name: str, hint: Any, help_text: str
) -> None:
    # `%` would be read as a format directive by argparse's help formatter
    help_text = help_text.replace("%", "%%")
    if hint is bool:
        group.add_argument(*flags, dest=name, action="store_true", default=None, help=help_text)
    elif get_origin(hint) is tuple:
        metavar = "NAME=PATH" if name == "lora_paths" else "NAME"
        group.add_argument(*flags, dest=name, nargs="+", metavar=metavar, help=help_text)
    elif get_origin(hint) is Literal:
        choices = [str(choice) for choice in get_args(hint)]
        group.add_argument(*flags, dest=name, choices=choices, help=help_text)
    elif hint in (int, float, str):
        metavar = name.rsplit("_", 1)[-1].upper() if hint is str else hint.__name__.upper()
        group.add_argument(*flags, dest=name, type=hint, metavar=metavar, help=help_text)
    else:
        raise TypeError(f"no flag type for config field {name}: {hint!r}")
