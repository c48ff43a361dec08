"""HTTP layer (aiohttp): SGLang, OpenAI and vLLM adapter-admin routes and /metrics over an Engine.

Wire formats live here and nowhere else: bodies are parsed into the engine's typed submissions,
its typed results are formatted into each dialect's answers. Never imports torch.
"""

from __future__ import annotations

from lorasrv.http.app import build_app, make_runner, serve, serve_async

__all__ = ["build_app", "make_runner", "serve", "serve_async"]
