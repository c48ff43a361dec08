"""Config loading: TOML sections or flat keys, flat overrides; messages name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorasrv.config import (
    SECTION_OF,
    LoraRef,
    ServerConfig,
    adapter_name_problem,
    build_config,
    load_config,
    lora_enabled,
    parse_lora_path,
)
from lorasrv.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("/ad/x", LoraRef(lora_name="/ad/x", lora_path="/ad/x")),
        ("x=/ad/x", LoraRef(lora_name="x", lora_path="/ad/x")),
        (
            '{"lora_name": "x", "lora_path": "/ad/x", "pinned": true}',
            LoraRef(lora_name="x", lora_path="/ad/x", pinned=True),
        ),
        ({"lora_name": "x", "lora_path": "/ad/x"}, LoraRef(lora_name="x", lora_path="/ad/x")),
    ],
)
def test_parse_lora_path_forms(entry: str, expected: LoraRef) -> None:
    assert parse_lora_path(entry) == expected


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("", "empty entry"),
        ("=/ad/x", "NAME=PATH"),
        ("x=", "NAME=PATH"),
        ('{"lora_name": "x"', "bad JSON"),
        ('{"lora_name": "x"}', "lora_path"),
        ('{"lora_name": "x", "lora_path": "p", "rank": 8}', "rank"),
    ],
)
def test_parse_lora_path_errors_name_the_problem(entry: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"^--lora-paths") as info:
        parse_lora_path(entry)
    assert needle in str(info.value)


def test_defaults() -> None:
    config = build_config({})
    assert config == ServerConfig()
    assert config.adapters.max_loras_per_batch == 8
    assert config.http.port == 30000
    assert config.model.model_path is None  # the engine serves the demo model


def test_file_sections_and_flat_keys_then_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'port = 8000\nlora_paths = ["a=/ad/a"]\n[model]\nmodel_path = "/m"\n'
        '[adapters]\nmax_loras_per_batch = 4\n[http]\nhost = "0.0.0.0"\n',
    )
    config = build_config({"port": 9000, "max_lora_rank": 16, "host": None}, path)
    assert config.http.port == 9000  # flag beats file
    assert config.http.host == "0.0.0.0"  # None means "not given"
    assert config.model.model_path == "/m"
    assert config.adapters.max_loras_per_batch == 4
    assert config.adapters.max_lora_rank == 16
    assert config.adapters.lora_paths == (LoraRef(lora_name="a", lora_path="/ad/a"),)
    assert lora_enabled(config.adapters)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("bogus_key = 1\n", "'bogus_key'"),
        ("[http]\npage_size = 4\n", "[http] 'page_size'"),
        ("[model]\nmodel_paht = '/m'\n", "'model_paht'"),
        ("port = 'eighty'\n", "--port: expected int, got str"),
        ("port = 70000\n", "--port must be <= 65535"),
        ("mem_fraction_static = 1.5\n", "--mem-fraction-static must be <= 1.0"),
        ("dtype = 'int4'\n", "--dtype: invalid enum value 'int4'"),
        ("lora_paths = [{lora_name = 3, lora_path = '/x'}]\n", "--lora-paths (lora_name)"),
        ("port = \n", "server.toml"),
    ],
)
def test_bad_file_names_the_setting(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({}, write(tmp_path, text))
    assert needle in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file"):
        build_config({}, tmp_path / "nope.toml")


def test_unknown_flat_option() -> None:
    with pytest.raises(ConfigError, match="'max_lora'"):
        build_config({"max_lora": 3})


def test_max_loaded_loras_below_per_batch_names_both_flags() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"max_loaded_loras": 2, "max_loras_per_batch": 4})
    assert "--max-loaded-loras (2)" in str(info.value)
    assert "--max-loras-per-batch (4)" in str(info.value)


def test_pin_limit_names_the_flag() -> None:
    pinned = [{"lora_name": f"a{i}", "lora_path": f"/ad/{i}", "pinned": True} for i in range(2)]
    build_config({"lora_paths": pinned[:1], "max_loras_per_batch": 2})
    with pytest.raises(ConfigError, match="--max-loras-per-batch - 1 = 1"):
        build_config({"lora_paths": pinned, "max_loras_per_batch": 2})


def test_duplicate_adapter_names() -> None:
    with pytest.raises(ConfigError, match="given twice: a"):
        build_config({"lora_paths": ["a=/x", "a=/y"]})


def test_adapter_names_are_short_and_printable() -> None:
    assert adapter_name_problem("demo-lora-a") is None
    assert adapter_name_problem("x" * 256) is None
    assert "at most 256" in (adapter_name_problem("x" * 257) or "")
    assert "control characters" in (adapter_name_problem("a\nb") or "")
    assert "empty" in (adapter_name_problem("") or "")
    with pytest.raises(ConfigError, match="--lora-paths: adapter name is 300 characters"):
        build_config({"lora_paths": [f"{'n' * 300}=/x"]})


def test_target_modules() -> None:
    assert build_config({"lora_target_modules": "all"}).adapters.lora_target_modules == ("all",)
    with pytest.raises(ConfigError, match="'all' must be given alone"):
        build_config({"lora_target_modules": ["all", "q_proj"]})
    with pytest.raises(ConfigError, match="lm_head"):
        build_config({"lora_target_modules": ["lm_head"]})


def test_load_config_checks_constraints() -> None:
    with pytest.raises(ConfigError, match=r"^--max-running-requests must be >= 1$"):
        load_config({"scheduler": {"max_running_requests": 0}})


def test_every_option_has_one_section() -> None:
    sections = set(SECTION_OF.values())
    assert sections == {"model", "cache", "scheduler", "adapters", "http"}
    for name, section in SECTION_OF.items():
        assert name in getattr(ServerConfig(), section).__struct_fields__
