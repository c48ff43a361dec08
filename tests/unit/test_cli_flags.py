"""The flag table: help with defaults, --version, vLLM aliases, and the README's server.toml."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import lorasrv
from lorasrv.cli import build_parser, main, parse_config
from lorasrv.cli_flags import HELP, NONE_MEANS, VLLM_ALIASES, flag_of
from lorasrv.config import SECTION_OF, LoraRef, ServerConfig, parse_lora_path

README = Path(__file__).resolve().parents[2] / "README.md"


def help_text(capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["--help"]) == 0
    return " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping


def test_every_setting_has_help_and_a_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(HELP) == set(SECTION_OF)
    defaults = {name: getattr(getattr(ServerConfig(), s), name) for name, s in SECTION_OF.items()}
    assert set(NONE_MEANS) == {name for name, value in defaults.items() if value is None}
    text = help_text(capsys)
    for name in SECTION_OF:
        # `--flag METAVAR  help (default: X)`: every flag's own line carries its default
        entry = re.search(re.escape(flag_of(name)) + r"\b[^(]*\(default: ([^)]*)\)", text)
        assert entry is not None, name
        assert entry[1].strip(), name
    assert "(default: 8)" in text  # --max-loras-per-batch
    assert "(default: the embedded demo model)" in text  # --model-path


def test_help_opens_with_a_one_line_description(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys)
    assert "Multi-LoRA LLM inference server" in text
    assert build_parser().description is not None
    assert "\n" not in build_parser().description


def test_help_lists_every_vllm_alias(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys)
    for alias in [*VLLM_ALIASES, "--disable-log-stats", "--served-model-name", "--max-lora-rank"]:
        assert re.search(rf"(?<![\w-]){re.escape(alias)}(?![\w-])", text), alias


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lorasrv {lorasrv.__version__}"
    done = subprocess.run(
        [sys.executable, "-m", "lorasrv", "--version"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == f"lorasrv {lorasrv.__version__}"
    assert "torch" not in done.stderr


VLLM_LORA = '{"name": "b", "path": "/ad/b", "base_model_name": "m"}'


@pytest.mark.parametrize(
    ("argv", "section", "name", "value"),
    [
        (["--lora-modules", "a=/ad/a", VLLM_LORA], "adapters", "lora_paths",
         (LoraRef(lora_name="a", lora_path="/ad/a"), LoraRef(lora_name="b", lora_path="/ad/b"))),
        (["--tensor-parallel-size", "2"], "model", "tp_size", 2),
        (["-tp", "4"], "model", "tp_size", 4),
        (["--served-model-name", "mine"], "model", "served_model_name", "mine"),
        (["--max-lora-rank", "32"], "adapters", "max_lora_rank", 32),
        (["--max-loras", "4"], "adapters", "max_loras_per_batch", 4),
        (["--max-cpu-loras", "12"], "adapters", "max_loaded_loras", 12),
        (["--model", "/m"], "model", "model_path", "/m"),
        (["--tokenizer", "/t"], "model", "tokenizer_path", "/t"),
        (["--max-model-len", "4096"], "model", "context_length", 4096),
        (["--gpu-memory-utilization", "0.8"], "cache", "mem_fraction_static", 0.8),
        (["--enforce-eager"], "model", "disable_cuda_graph", True),
        (["--max-num-seqs", "64"], "scheduler", "max_running_requests", 64),
        (["--max-num-batched-tokens", "512"], "scheduler", "chunked_prefill_size", 512),
        (["--disable-log-stats"], "http", "log_stats_interval", 0.0),
        (["--log-stats-interval", "2.5"], "http", "log_stats_interval", 2.5),
    ],
)  # fmt: skip
def test_vllm_aliases_set_the_sglang_setting(
    argv: list[str], section: str, name: str, value: Any
) -> None:
    assert getattr(getattr(parse_config(argv, {}), section), name) == value


def test_an_alias_error_names_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--max-loras", "0"]) == 2
    assert capsys.readouterr().err.strip() == "lorasrv: error: --max-loras-per-batch must be >= 1"


def readme_server_toml() -> str:
    """The ```toml block under the README's server.toml heading."""
    text = README.read_text()
    match = re.search(r"`server\.toml`.*?```toml\n(.*?)```", text, re.DOTALL)
    assert match is not None, "README has no server.toml example"
    return match[1]


def test_readme_server_toml_starts_a_config(tmp_path: Path) -> None:
    example = readme_server_toml()
    path = tmp_path / "server.toml"
    path.write_text(example)
    config = parse_config(["--config", str(path)], {})
    raw = tomllib.loads(example)
    checked = 0
    for section, values in raw.items():
        assert isinstance(values, dict), f"[{section}]: the example uses sections"
        for key, value in values.items():
            assert SECTION_OF[key] == section, key
            got = getattr(getattr(config, section), key)
            if key == "lora_paths":
                value = [parse_lora_path(entry) for entry in value]
            assert got == (tuple(value) if isinstance(value, list) else value), key
            checked += 1
    assert checked >= 10
    # documented: every key has a comment on its line or the line above
    lines = example.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+ =", line):
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), line
