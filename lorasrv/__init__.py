"""lorasrv: one Llama-family base model, many LoRA adapters, one continuous batch.

`Engine` is the embeddable API the HTTP server itself uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Engine", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from lorasrv.engine.engine import Engine


def __getattr__(name: str) -> Any:
    # Lazy, so `import lorasrv` stays light (the CLI parses flags before torch loads).
    if name == "Engine":
        from lorasrv.engine.engine import Engine

        return Engine
    raise AttributeError(name)
