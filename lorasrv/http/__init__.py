"""HTTP layer (aiohttp): SGLang, OpenAI and vLLM adapter-admin routes and /metrics over an Engine.

Imports the engine only for typing; never torch.
"""

from __future__ import annotations

from lorasrv.http.app import build_app, make_runner, serve, serve_async
from lorasrv.http.state import EngineLike

__all__ = ["EngineLike", "build_app", "make_runner", "serve", "serve_async"]
