"""`python -m lorasrv` argument handling: flags from the config Structs, env, file, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lorasrv.cli import build_parser, env_options, main, parse_config
from lorasrv.config import SECTION_OF, LoraRef, ServerConfig


def test_every_config_option_is_a_flag() -> None:
    flags: dict[str, list[str]] = {}
    for action in build_parser()._actions:
        flags.setdefault(action.dest, []).extend(action.option_strings)
    for name in SECTION_OF:
        assert "--" + name.replace("_", "-") in flags[name], name


@pytest.mark.parametrize(
    "flag",
    [
        "--model-path", "--served-model-name", "--tokenizer-path", "--revision", "--dtype",
        "--device", "--host", "--port", "--enable-lora", "--lora-paths", "--max-loras-per-batch",
        "--max-loaded-loras", "--lora-backend", "--max-lora-rank", "--lora-target-modules",
        "--lora-eviction-policy", "--tp-size", "--max-running-requests", "--context-length",
        "--chunked-prefill-size", "--page-size", "--mem-fraction-static", "--kv-cache-bytes",
        "--num-kv-pages", "--max-queued-requests", "--api-key", "--admin-api-key",
        "--log-level", "--seed", "--disable-cuda-graph", "--allow-pickle",
        "--enable-mixed-chunk", "--disable-overlap-schedule",
    ],
)  # fmt: skip
def test_sglang_flag_names(flag: str) -> None:
    assert flag in build_parser()._option_string_actions


def test_flags_parse_to_config() -> None:
    config = parse_config(
        [
            "--model-path", "/m", "--dtype", "bfloat16", "--port", "8001", "--enable-lora",
            "--lora-paths", "/ad/plain", "b=/ad/b",
            '{"lora_name": "c", "lora_path": "/ad/c", "pinned": true}',
            "--max-loras-per-batch", "3", "--lora-target-modules", "q_proj", "v_proj",
            "--mem-fraction-static", "0.5", "--disable-cuda-graph", "--disable-overlap-schedule",
        ],
        {},
    )  # fmt: skip
    assert config.model.model_path == "/m"
    assert config.model.dtype == "bfloat16"
    assert config.model.disable_cuda_graph is True
    assert config.scheduler.disable_overlap_schedule is True
    assert config.model.allow_pickle is False
    assert config.http.port == 8001
    assert config.cache.mem_fraction_static == 0.5
    assert config.adapters.enable_lora is True
    assert config.adapters.lora_paths == (
        LoraRef(lora_name="/ad/plain", lora_path="/ad/plain"),
        LoraRef(lora_name="b", lora_path="/ad/b"),
        LoraRef(lora_name="c", lora_path="/ad/c", pinned=True),
    )
    assert config.adapters.lora_target_modules == ("q_proj", "v_proj")


def test_no_flags_is_the_default_config() -> None:
    assert parse_config([], {}) == ServerConfig()


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        '[http]\nport = 1000\nhost = "0.0.0.0"\nlog_level = "debug"\n[model]\nseed = 5\n'
    )
    env = {"LORASRV_PORT": "2000", "LORASRV_HOST": "10.0.0.1", "LORASRV_API_KEY": "k"}
    config = parse_config(["--config", str(path), "--port", "3000"], env)
    assert config.http.port == 3000  # flag
    assert config.http.host == "10.0.0.1"  # env over file
    assert config.http.log_level == "debug"  # file over default
    assert config.http.api_key == "k"
    assert config.model.seed == 5
    assert config.adapters.max_loras_per_batch == 8  # default


def test_config_file_from_env(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text("port = 1234\n")
    assert parse_config([], {"LORASRV_CONFIG": str(path)}).http.port == 1234


PIN_A = '{"lora_name": "a", "lora_path": "/a", "pinned": true}'
PIN_B = '{"lora_name": "b", "lora_path": "/b", "pinned": true}'
JSON_LIST = '[{"lora_name": "a", "lora_path": "/x"}]'
JSON_ITEMS = [{"lora_name": "a", "lora_path": "/x"}]
MODULES = ("q_proj", "o_proj")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LORASRV_ENABLE_LORA": "yes"}, {"enable_lora": True}),
        ({"LORASRV_ALLOW_PICKLE": "0"}, {"allow_pickle": False}),
        ({"LORASRV_DISABLE_OVERLAP_SCHEDULE": "on"}, {"disable_overlap_schedule": True}),
        ({"LORASRV_MAX_LORAS_PER_BATCH": "4"}, {"max_loras_per_batch": 4}),
        ({"LORASRV_MEM_FRACTION_STATIC": "0.7"}, {"mem_fraction_static": 0.7}),
        ({"LORASRV_LORA_TARGET_MODULES": "q_proj o_proj"}, {"lora_target_modules": MODULES}),
        ({"LORASRV_LORA_PATHS": "a=/x /y"}, {"lora_paths": ["a=/x", "/y"]}),
        ({"LORASRV_LORA_PATHS": JSON_LIST}, {"lora_paths": JSON_ITEMS}),
        ({"LORASRV_PORT": "", "OTHER": "1"}, {}),
    ],
)  # fmt: skip
def test_env_options(env: dict[str, str], expected: dict[str, Any]) -> None:
    assert env_options(env) == expected


def test_main_exits_2_on_unknown_toml_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "server.toml"
    path.write_text("[adapters]\nmax_lora_per_batch = 4\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorasrv: error: ")
    assert "'max_lora_per_batch'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "env", "needles"),
    [
        (
            ["--max-loaded-loras", "2", "--max-loras-per-batch", "4"],
            {},
            ["--max-loaded-loras", "--max-loras-per-batch"],
        ),
        (
            ["--max-loras-per-batch", "2", "--lora-paths", PIN_A, PIN_B],
            {},
            ["pins 2", "--max-loras-per-batch"],
        ),
        (["--max-loras-per-batch", "0"], {}, ["--max-loras-per-batch must be >= 1"]),
        (["--lora-paths", "=oops"], {}, ["--lora-paths", "NAME=PATH"]),
        (["--lora-target-modules", "lm_head"], {}, ["--lora-target-modules", "lm_head"]),
        ([], {"LORASRV_PORT": "eighty"}, ["LORASRV_PORT", "Expected `int`"]),
        ([], {"LORASRV_ENABLE_LORA": "maybe"}, ["LORASRV_ENABLE_LORA"]),
        (
            [],
            {"LORASRV_DISABLE_OVERLAP_SCHEDULE": "sometimes"},
            ["LORASRV_DISABLE_OVERLAP_SCHEDULE", "expected 1/0, true/false"],
        ),
        (["--config", "/nonexistent/server.toml"], {}, ["/nonexistent/server.toml"]),
    ],
)
def test_main_exits_2_naming_the_problem(
    argv: list[str],
    env: dict[str, str],
    needles: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorasrv: error: "), err
    for needle in needles:
        assert needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--port", "abc"], "argument --port: invalid int value: 'abc'"),
        (["--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        # a switch takes no value
        (["--disable-overlap-schedule", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_malformed_flags_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lorasrv: error: " in err
    assert needle in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--lora-paths" in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lorasrv", "--port", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "lorasrv: error:" in done.stderr
