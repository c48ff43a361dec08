"""Bench scripts write to a scratch path unless told otherwise: a run never overwrites the committed
bench/results/ by default (only an explicit `--out`/`--json`/`OUT` may point there)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def is_path_like(value: object) -> bool:
    """A one-line string with a slash (docstrings and help paragraphs are not paths)."""
    return isinstance(value, str) and "/" in value and "\n" not in value


def path_constants(tree: ast.AST) -> list[str]:
    """String constants used as paths: `x / "results"` operands and strings holding a slash."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str):
                    found.append(side.value)
        elif isinstance(node, ast.Constant) and is_path_like(node.value):
            found.append(node.value)
    return found


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_python_bench_has_no_results_path(script: Path) -> None:
    tree = ast.parse(script.read_text())
    assert not [p for p in path_constants(tree) if re.search(r"(^|/)results(/|$)", p)]


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.sh")), ids=lambda p: p.name)
def test_shell_bench_defaults_are_scratch(script: Path) -> None:
    code = [line.split("#", 1)[0] for line in script.read_text().splitlines()]
    assert not [line for line in code if re.search(r"(^|/)results(/|$)", line)]
