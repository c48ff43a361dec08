"""Server configuration: frozen msgspec Structs, one per concern, validated by `load_config()`.

Config is never written after load; values measured at startup travel in `RunnerReady`.
"""

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from lorasrv.errors import ConfigError

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Fraction = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]

#: Every LoRA target the model supports; `all` on the command line means these.
SUPPORTED_LORA_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model_path: str | None = None  # None: the embedded demo model
    served_model_name: str | None = None
    tokenizer_path: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    context_length: PositiveInt | None = None
    tp_size: PositiveInt = 1
    seed: int = 0
    disable_cuda_graph: bool = False
    allow_pickle: bool = False  # .bin checkpoints are refused unless this is set


class CacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    page_size: PositiveInt = 16
    mem_fraction_static: Fraction = 0.85  # CUDA: share of free memory for weights + KV
    kv_cache_bytes: PositiveInt | None = None  # explicit KV budget (CPU default: 256 MiB)
    num_kv_pages: PositiveInt | None = None  # override; tests use it to force preemption


class SchedulerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_running_requests: PositiveInt = 256
    chunked_prefill_size: PositiveInt = 2048  # token budget of one step
    max_queued_requests: PositiveInt = 4096  # ingress bound; beyond it requests get 503
    enable_mixed_chunk: bool = False  # SGLang's flag: prefill chunks ride along decode steps
    # SGLang's flag: off, the runner waits for each step's tokens before starting the next
    disable_overlap_schedule: bool = False
    # SGLang's flag: no prefix cache (every prompt is computed from its first token)
    disable_radix_cache: bool = False


class LoraRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    lora_name: str
    lora_path: str
    pinned: bool = False


MAX_ADAPTER_NAME_CHARS = 256


def adapter_name_problem(name: str) -> str | None:
    """Why an adapter name is refused, else None. Names become metric labels and log text, so
    they are short and printable."""
    if not name:
        return "adapter name must not be empty"
    if len(name) > MAX_ADAPTER_NAME_CHARS:
        return f"adapter name is {len(name)} characters long; at most {MAX_ADAPTER_NAME_CHARS}"
    if not name.isprintable():
        return f"adapter name {name[:40]!r} holds control characters; only printable ones"
    return None


class AdapterConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    enable_lora: bool = False
    lora_paths: tuple[LoraRef, ...] = ()
    # Distinct adapters in a batch: None = as many as adapter memory holds (SGLang's default
    # is 8; here memory bounds it); given = a cap.
    max_loras_per_batch: PositiveInt | None = None
    max_loaded_loras: PositiveInt | None = None
    lora_backend: Literal["auto", "triton", "torch"] = "auto"
    max_lora_rank: PositiveInt | None = None
    lora_target_modules: tuple[str, ...] | None = None
    lora_eviction_policy: Literal["lru", "fifo"] = "lru"


class HttpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 30000
    api_key: str | None = None
    admin_api_key: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_stats_interval: Annotated[float, msgspec.Meta(ge=0.0)] = 10.0  # seconds; 0: off
    graceful_shutdown_timeout: Annotated[float, msgspec.Meta(ge=0.0)] = 30.0  # seconds


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    adapters: AdapterConfig = msgspec.field(default_factory=AdapterConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)


#: flat option name (CLI flag in snake_case) -> section of ServerConfig that holds it
SECTION_OF: dict[str, str] = {
    name: section
    for section, cls in (
        ("model", ModelConfig),
        ("cache", CacheConfig),
        ("scheduler", SchedulerConfig),
        ("adapters", AdapterConfig),
        ("http", HttpConfig),
    )
    for name in cls.__struct_fields__
}


def parse_lora_path(entry: str | dict[str, Any] | LoraRef) -> LoraRef:
    """One `--lora-paths` entry: `PATH`, `NAME=PATH` or a JSON object (lora_name, lora_path,
    pinned; vLLM's `--lora-modules` keys name, path and base_model_name are taken too)."""
    if isinstance(entry, LoraRef):
        return entry
    if isinstance(entry, dict):
        ref: LoraRef = _convert(_from_vllm_keys(entry), LoraRef, "--lora-paths")
        return ref
    text = entry.strip()
    if not text:
        raise ConfigError("--lora-paths: empty entry")
    if text.startswith("{"):
        try:
            raw = msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            raise ConfigError(f"--lora-paths: bad JSON entry {text!r}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--lora-paths: JSON entry must be an object: {text!r}")
        parsed: LoraRef = _convert(_from_vllm_keys(raw), LoraRef, "--lora-paths")
        return parsed
    if "=" in text:
        name, _, path = text.partition("=")
        if not name or not path:
            raise ConfigError(f"--lora-paths: expected NAME=PATH, got {text!r}")
        return LoraRef(lora_name=name, lora_path=path)
    return LoraRef(lora_name=text, lora_path=text)


def _from_vllm_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """vLLM's `{"name", "path", "base_model_name"}` as ours; the base is the served model."""
    if "name" not in raw and "path" not in raw:
        return raw
    renamed = {"name": "lora_name", "path": "lora_path"}
    return {renamed.get(k, k): v for k, v in raw.items() if k != "base_model_name"}


def _convert(raw: Any, cls: type[Any], where: str) -> Any:
    try:
        return msgspec.convert(raw, cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(describe_error(str(exc), where)) from None


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_BOUND = re.compile(r"^Expected `\w+` (?P<bound>[<>]=? \S+)$")
_TYPE = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`$")


def describe_error(message: str, where: str) -> str:
    """msgspec's `Expected `int` >= 1 - at `$.adapters.max_loras_per_batch`` as the user's
    words: `--max-loras-per-batch must be >= 1`."""
    match = _AT.match(message)
    assert match is not None  # the pattern matches any text
    what, path = match["what"], match["path"] or ""
    keys = re.findall(r"\.(\w+)", path)
    name = next((key for key in keys if key in SECTION_OF), None)
    if name is None:
        subject = f"{where} ({path.lstrip('.')})" if path else where
    else:
        subject = "--" + name.replace("_", "-")
    if name is not None and path.split(name, 1)[1]:
        subject += f" ({path.split(name, 1)[1].lstrip('.')})"  # e.g. lora_paths[1].lora_name
    if bound := _BOUND.match(what):
        return f"{subject} must be {bound['bound']}"
    if wrong := _TYPE.match(what):
        return f"{subject}: expected {wrong['want']}, got {wrong['got']}"
    return f"{subject}: {what[:1].lower()}{what[1:]}"


def build_config(flat: dict[str, Any], file_path: str | Path | None = None) -> ServerConfig:
    """Merge a TOML file (sections or flat keys) with flat overrides, then validate."""
    tree: dict[str, dict[str, Any]] = {section: {} for section in set(SECTION_OF.values())}
    if file_path is not None:
        try:
            raw = tomllib.loads(Path(file_path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {file_path}: {exc}") from None
        for key, value in raw.items():
            if key in tree and isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    _put(tree, sub_key, sub_value, expect_section=key)
            else:
                _put(tree, key, value)
    for key, value in flat.items():
        if value is not None:
            _put(tree, key, value)
    return load_config(tree)


def _put(
    tree: dict[str, dict[str, Any]], key: str, value: Any, expect_section: str | None = None
) -> None:
    name = key.replace("-", "_")
    section = SECTION_OF.get(name)
    if section is None or (expect_section is not None and section != expect_section):
        where = f"[{expect_section}] " if expect_section else ""
        raise ConfigError(f"unknown setting {where}{key!r}")
    if name == "lora_paths":
        items = value if isinstance(value, list | tuple) else [value]
        value = [msgspec.to_builtins(parse_lora_path(item)) for item in items]
    if name == "lora_target_modules" and isinstance(value, str):
        value = [value]
    tree[section][name] = value


def load_config(raw: dict[str, Any]) -> ServerConfig:
    """Validate a nested dict into a ServerConfig; any problem is a ConfigError naming the key."""
    config: ServerConfig = _convert(raw, ServerConfig, "config")
    _check_adapters(config.adapters)
    return config


def _check_adapters(cfg: AdapterConfig) -> None:
    per_batch = cfg.max_loras_per_batch
    loaded = cfg.max_loaded_loras
    if per_batch is not None and loaded is not None and loaded < per_batch:
        raise ConfigError(
            f"--max-loaded-loras ({loaded}) must be >= --max-loras-per-batch ({per_batch})"
        )
    names = [ref.lora_name for ref in cfg.lora_paths]
    for name in names:
        problem = adapter_name_problem(name)
        if problem is not None:
            raise ConfigError(f"--lora-paths: {problem} (NAME=PATH names a long path)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"--lora-paths: adapter name given twice: {', '.join(duplicates)}")
    num_pinned = sum(ref.pinned for ref in cfg.lora_paths)
    # Without a cap, the pinning rule is checked at load against what memory holds.
    if per_batch is not None and num_pinned > per_batch - 1:
        raise ConfigError(
            f"--lora-paths pins {num_pinned} adapters; at most --max-loras-per-batch - 1 = "
            f"{per_batch - 1} may be pinned so unpinned requests never starve"
        )
    modules = cfg.lora_target_modules
    if modules is not None:
        if "all" in modules and len(modules) != 1:
            raise ConfigError("--lora-target-modules: 'all' must be given alone")
        unknown = [m for m in modules if m != "all" and m not in SUPPORTED_LORA_MODULES]
        if unknown:
            raise ConfigError(
                f"--lora-target-modules: unsupported module(s) {unknown}; "
                f"supported: {', '.join(SUPPORTED_LORA_MODULES)} or all"
            )


def lora_enabled(cfg: AdapterConfig) -> bool:
    """`--enable-lora` is implied by `--lora-paths`, as in SGLang."""
    return cfg.enable_lora or bool(cfg.lora_paths)
