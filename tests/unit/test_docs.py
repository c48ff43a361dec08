"""docs/architecture.md opens with an overview of the whole system that keeps up with the code."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from lorasrv import messages

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def overview() -> str:
    text = DOC.read_text()
    assert text.startswith("# lorasrv architecture\n\n## Overview\n")
    return text.split("\n# ", 1)[0]  # up to the next top-level section


def test_overview_names_every_actor_and_inbox_message() -> None:
    text = overview()
    for actor in ("TokenizerActor", "SchedulerActor", "AdapterManagerActor", "GpuRunnerActor"):
        assert f"`{actor}`" in text, actor
    inboxes = (messages.TokenizerInbox, messages.SchedulerInbox, messages.AdapterInbox,
               messages.RunnerInbox)  # fmt: skip
    for inbox in inboxes:
        for message in typing.get_args(inbox):
            assert re.search(rf"\b{message.__name__}\b", text), message.__name__


def test_overview_covers_lifecycle_model_kernels_and_tp() -> None:
    headings = re.findall(r"^### (.+)$", overview(), re.MULTILINE)
    assert headings == [
        "Processes and threads", "Actors and messages", "Life of a request", "Adapters",
        "Startup and shutdown", "Model and kernels", "Tensor parallelism",
    ]  # fmt: skip


def test_docs_stand_alone() -> None:
    """No links or paths outside the repo (other projects' files, machines, URLs to code)."""
    text = DOC.read_text()
    assert not re.findall(r"\]\((?:https?:|/|\.\./)", text)
    assert "/work/" not in text
    assert "github.com" not in text
