"""`python -m lorasrv`: argv, `LORASRV_*` environment and a TOML file -> ServerConfig -> server.

Flags come from the flag table (`cli_flags.py`). Precedence: defaults < file < environment <
flags. No server logic lives here.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, get_origin

import msgspec

from lorasrv.cli_flags import ENV_PREFIX, build_parser, option_types, plain_type
from lorasrv.config import ServerConfig, build_config
from lorasrv.errors import ConfigError, LorasrvError

__all__ = ["build_parser", "env_options", "main", "parse_config"]
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


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
    if plain_type(hint) is bool:
        word = raw.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise msgspec.ValidationError("expected 1/0, true/false, yes/no or on/off")
        return word in TRUE_WORDS
    if get_origin(plain_type(hint)) is not tuple:
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
    """Parse, configure logging, serve. Returns the process exit status (2: bad config).

    Startup problems (a bad setting, the address in use, a missing model or adapter folder) end in
    one `lorasrv: error: ...` line; `--log-level debug` adds the traceback.
    """
    try:
        config = parse_config(argv, os.environ)
    except SystemExit as exc:  # argparse: --help, --version or a malformed flag (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        return _fail(exc, 2, debug=False)
    debug = config.http.log_level == "debug"
    logging.basicConfig(
        level=config.http.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from lorasrv.http.listen import bind_sockets

    try:  # NOTE: before the model loads, so a taken port fails in a second, not after minutes
        sockets = bind_sockets(config.http.host, config.http.port)
    except ConfigError as exc:
        return _fail(exc, 2, debug)
    from lorasrv.engine.engine import Engine  # lazily: it imports torch
    from lorasrv.http.app import serve

    try:
        return serve(config, lambda: Engine(config), sockets=sockets)
    except ConfigError as exc:  # found at engine start (model path, adapter folder, ...)
        return _fail(exc, 2, debug)
    except (LorasrvError, OSError) as exc:
        return _fail(exc, 1, debug)
    except KeyboardInterrupt:
        return 130
    finally:
        for sock in sockets:
            sock.close()


def _fail(exc: BaseException, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    text = str(exc) if isinstance(exc, LorasrvError) else f"{type(exc).__name__}: {exc}"
    print(f"lorasrv: error: {text}", file=sys.stderr)
    return status
