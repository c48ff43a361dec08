"""Refuse regular expressions from untrusted files that could backtrack for minutes.

Adapter configs carry regexes (`target_modules`, `rank_pattern` and `alpha_pattern` keys) that
PEFT's rules match against module names. Python's `re` backtracks and holds the GIL for a whole
match, so one pattern such as `(.*)*x` would freeze every request of the server. Pure, stdlib.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

MAX_PATTERN_CHARS = 256
# Unbounded repeats in one pattern. With none nested, a failing match costs about n^k steps for
# k repeats over a module name of n (~40) characters: 3 keeps one match under a millisecond.
MAX_UNBOUNDED_REPEATS = 3
_LONG_REPEAT = 16  # {n,m} with m above this counts as unbounded
# NOTE: re's own parser (re._parser since Python 3.11), so the check sees the syntax `re` runs.
_parser: Any = importlib.import_module("re._parser")
_REPEATS = frozenset(
    getattr(_parser, name)
    for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(_parser, name)
)


def regex_problem(pattern: str) -> str | None:
    """Why the pattern is refused (invalid, too long, or can backtrack badly), else None."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    try:
        re.compile(pattern)
        parsed = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"not a valid regular expression ({exc})"
    unbounded = _count_repeats(list(parsed), inside_repeat=False)
    if unbounded is None:
        return "a repeat inside a repeat, or an alternation inside a repeat, can backtrack badly"
    if unbounded > MAX_UNBOUNDED_REPEATS:
        return f"more than {MAX_UNBOUNDED_REPEATS} unbounded repeats (*, +, {{n,}}, {{n,m}} m>16)"
    return None


def _count_repeats(items: list[tuple[Any, Any]], *, inside_repeat: bool) -> int | None:
    """Unbounded repeats in the parsed pattern; None when a repeat or a branch sits inside a
    repeat (of more than one)."""
    count = 0
    for op, arg in items:
        if inside_repeat and (op in _REPEATS or op is _parser.BRANCH):
            return None
        if op in _REPEATS and arg[1] > _LONG_REPEAT:
            count += 1
        for sub, repeated in _children(op, arg):
            found = _count_repeats(sub, inside_repeat=inside_repeat or repeated)
            if found is None:
                return None
            count += found
    return count


def _children(op: Any, arg: Any) -> list[tuple[list[tuple[Any, Any]], bool]]:
    """Sub-patterns of one parsed item, each with whether it is the body of a repeat."""
    if op in _REPEATS:
        _, high, body = arg
        return [(list(body), high > 1)]
    if op is _parser.SUBPATTERN:
        return [(list(arg[-1]), False)]
    if op is _parser.BRANCH:
        return [(list(branch), False) for branch in arg[1]]
    if op in (_parser.ASSERT, _parser.ASSERT_NOT):
        return [(list(arg[1]), False)]
    if op is _parser.GROUPREF_EXISTS:
        return [(list(branch), False) for branch in arg[1:] if branch is not None]
    if hasattr(_parser, "ATOMIC_GROUP") and op is _parser.ATOMIC_GROUP:
        return [(list(arg), False)]
    return []
