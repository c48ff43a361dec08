"""HTTP layer (aiohttp): SGLang-native and vLLM adapter-admin routes over an Engine.

Imports the engine only for typing; never torch.
"""

from __future__ import annotations

from lorasrv.http.app import build_app, make_runner, serve, serve_async
from lorasrv.http.state import EngineLike

__all__ = ["EngineLike", "build_app", "make_runner", "serve", "serve_async"]
