"""`python -m lorasrv`: argv, `LORASRV_*` environment and a TOML file -> ServerConfig -> server.

Flags are derived from the config Structs, so they never drift. Precedence: defaults < file <
environment < flags. No server logic lives here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import msgspec

from lorasrv.config import (
    AdapterConfig,
    CacheConfig,
    HttpConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    build_config,
)
from lorasrv.errors import ConfigError, LorasrvError

ENV_PREFIX = "LORASRV_"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
SECTIONS: tuple[tuple[str, type[msgspec.Struct]], ...] = (
    ("model", ModelConfig),
    ("cache", CacheConfig),
    ("scheduler", SchedulerConfig),
    ("adapters", AdapterConfig),
    ("http", HttpConfig),
)


HELP: dict[str, str] = {
    "model_path": "local Hugging Face folder or Hub id (default: the embedded demo model)",
    "lora_paths": "adapters to register: PATH | NAME=PATH | "
    '{"lora_name": ..., "lora_path": ..., "pinned": ...}',
    "lora_target_modules": "modules adapters may target, or 'all'",
    "api_key": f"require 'Authorization: Bearer KEY' (or {ENV_PREFIX}API_KEY)",
    "admin_api_key": "key for the adapter load/unload routes (default: --api-key)",
}


def option_types() -> dict[str, Any]:
    """Flat option name -> its annotated type (Annotated kept, so constraints still apply)."""
    return {
        name: hint
        for _, cls in SECTIONS
        for name, hint in get_type_hints(cls, include_extras=True).items()
    }


def _plain(hint: Any) -> Any:
    """Strip Annotated and `| None`: the value type a flag converts to."""
    while get_origin(hint) is not None and hasattr(hint, "__metadata__"):
        hint = get_args(hint)[0]
    if get_origin(hint) in (Union, types.UnionType):
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(members) == 1:
            return _plain(members[0])
    return hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorasrv",
        description="Multi-LoRA LLM inference server (SGLang-compatible flags).",
        epilog=f"Every flag can also be set as {ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}API_KEY) "
        "or in the TOML file; precedence: file < environment < flags.",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with the settings")
    for section, cls in SECTIONS:
        group = parser.add_argument_group(section)
        for name, hint in get_type_hints(cls, include_extras=True).items():
            _add_flag(group, name, _plain(hint))
    return parser


def _add_flag(group: argparse._ArgumentGroup, name: str, hint: Any) -> None:
    flag = "--" + name.replace("_", "-")
    help_text = HELP.get(name)
    if hint is bool:
        group.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
    elif get_origin(hint) is tuple:
        metavar = "NAME=PATH" if name == "lora_paths" else "NAME"
        group.add_argument(flag, dest=name, nargs="+", metavar=metavar, help=help_text)
    elif get_origin(hint) is Literal:
        choices = [str(choice) for choice in get_args(hint)]
        group.add_argument(flag, dest=name, choices=choices, help=help_text)
    elif hint in (int, float, str):
        metavar = name.rsplit("_", 1)[-1].upper() if hint is str else hint.__name__.upper()
        group.add_argument(flag, dest=name, type=hint, metavar=metavar, help=help_text)
    else:
        raise TypeError(f"no flag type for config field {name}: {hint!r}")


def env_options(environ: Mapping[str, str]) -> dict[str, Any]:
    """`LORASRV_<NAME>` values, converted to the field's type; a bad one is a ConfigError."""
    options: dict[str, Any] = {}
    for name, hint in option_types().items():
        var = ENV_PREFIX + name.upper()
        raw = environ.get(var)
        if raw is None or raw == "":
            continue
        try:
            options[name] = _env_value(name, hint, raw)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise ConfigError(f"{var}={raw!r}: {exc}") from None
    return options


def _env_value(name: str, hint: Any, raw: str) -> Any:
    if _plain(hint) is bool:
        word = raw.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise msgspec.ValidationError("expected 1/0, true/false, yes/no or on/off")
        return word in TRUE_WORDS
    if get_origin(_plain(hint)) is not tuple:
        return msgspec.convert(raw, hint, strict=False)  # "8" -> 8, "0.5" -> 0.5
    # A list: whitespace-separated like the flag, or a JSON array.
    items = msgspec.json.decode(raw) if raw.lstrip().startswith("[") else raw.split()
    if name == "lora_paths":
        return items  # entries are parsed (PATH | NAME=PATH | JSON) by build_config
    return msgspec.convert(items, hint, strict=False)


def parse_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> ServerConfig:
    """argv + environment -> a validated ServerConfig. Raises ConfigError, or argparse exits."""
    args = build_parser().parse_args(argv)
    flags = {key: value for key, value in vars(args).items() if key != "config"}
    flat = {**env_options(environ), **{k: v for k, v in flags.items() if v is not None}}
    config_file = args.config or environ.get(ENV_PREFIX + "CONFIG") or None
    return build_config(flat, config_file)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, configure logging, serve. Returns the process exit status (2: bad config)."""
    try:
        config = parse_config(argv, os.environ)
    except SystemExit as exc:  # argparse: --help or a malformed flag (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        print(f"lorasrv: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.http.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from lorasrv.engine.engine import Engine  # lazily: it imports torch
    from lorasrv.http.app import serve

    try:
        return serve(config, lambda: Engine(config))
    except ConfigError as exc:  # found at engine start (model path, adapter folder, ...)
        print(f"lorasrv: error: {exc}", file=sys.stderr)
        return 2
    except LorasrvError as exc:
        print(f"lorasrv: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
