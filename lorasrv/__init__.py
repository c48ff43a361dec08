"""lorasrv: one Llama-family base model, many LoRA adapters, one continuous batch.

`Engine` is the embeddable API the HTTP server itself uses: `Submission` in, `RequestResult`
(or a stream of output deltas) out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Engine", "RequestResult", "SamplingParams", "Submission", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from lorasrv.engine.engine import Engine
    from lorasrv.engine.requests import Submission
    from lorasrv.engine.results import RequestResult
    from lorasrv.messages import SamplingParams

_LAZY = {
    "Engine": "lorasrv.engine.engine",
    "Submission": "lorasrv.engine.requests",
    "RequestResult": "lorasrv.engine.results",
    "SamplingParams": "lorasrv.messages",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import lorasrv` stays light (the CLI parses flags before torch loads).
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)
