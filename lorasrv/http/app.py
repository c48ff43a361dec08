"""The aiohttp application: route table, middlewares, engine lifetime, and `serve()`.

`build_app` wires an Engine into routes; it starts/stops the engine only when it owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from lorasrv.config import ServerConfig
from lorasrv.engine.engine import Engine
from lorasrv.http import handlers, openai
from lorasrv.http.metrics import count_requests, metrics
from lorasrv.http.middleware import Access, auth_middleware, error_middleware
from lorasrv.http.state import CONFIG_KEY, CREATED_KEY, ENGINE_KEY

log = logging.getLogger(__name__)

#: request bodies beyond this are refused with 413 (a batch of long prompts fits easily)
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
ENGINE_WATCH_INTERVAL_S: Final = 1.0

ROUTES: Final[tuple[tuple[str, str, Handler, Access], ...]] = (
    ("POST", "/generate", handlers.generate, Access.USER),
    ("POST", "/load_lora_adapter", handlers.load_lora_adapter, Access.ADMIN),
    ("POST", "/unload_lora_adapter", handlers.unload_lora_adapter, Access.ADMIN),
    ("POST", "/v1/load_lora_adapter", handlers.load_lora_adapter, Access.ADMIN),
    ("POST", "/v1/unload_lora_adapter", handlers.unload_lora_adapter, Access.ADMIN),
    ("GET", "/v1/models", handlers.list_models, Access.USER),
    ("GET", "/v1/models/{model_id}", openai.retrieve_model, Access.USER),
    ("POST", "/v1/completions", openai.completions, Access.USER),
    ("POST", "/v1/chat/completions", openai.chat_completions, Access.USER),
    ("GET", "/metrics", metrics, Access.USER),
    ("GET", "/health", handlers.health, Access.OPEN),
    ("GET", "/health_generate", handlers.health_generate, Access.USER),
    ("GET", "/get_model_info", handlers.get_model_info, Access.USER),
    ("GET", "/get_server_info", handlers.get_server_info, Access.USER),
)


def build_app(
    config: ServerConfig,
    engine: Engine,
    *,
    manage_engine: bool = True,
    client_max_size: int = MAX_BODY_BYTES,
) -> web.Application:
    """The application. With `manage_engine`, app startup/cleanup start/stop the engine."""
    access_of = {path: access for _, path, _, access in ROUTES}
    app = web.Application(
        middlewares=[
            count_requests,
            error_middleware,
            auth_middleware(access_of, config.http.api_key, config.http.admin_api_key),
        ],
        client_max_size=client_max_size,
    )
    app[ENGINE_KEY] = engine
    app[CONFIG_KEY] = config
    app[CREATED_KEY] = int(time.time())
    for method, path, handler, _ in ROUTES:
        app.router.add_route(method, path, handler)
    if manage_engine:
        app.cleanup_ctx.append(_engine_lifetime)
    return app


async def _engine_lifetime(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE_KEY]
    await engine.start()
    log.info("engine started: serving %s", engine.served_model_name)
    try:
        yield
    finally:
        await engine.stop()
        log.info("engine stopped")


def make_runner(app: web.Application, *, access_log: bool = True) -> web.AppRunner:
    """The runner `serve` uses. NOTE: handler_cancellation makes a disconnect abort a request."""
    return web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
    )


async def serve_async(config: ServerConfig, engine: Engine) -> int:
    """Serve until SIGINT/SIGTERM (0) or until the engine dies (1); always stops the engine."""
    runner = make_runner(build_app(config, engine, manage_engine=True))
    await runner.setup()  # starts the engine
    try:
        site = web.TCPSite(runner, config.http.host, config.http.port)
        await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            log.info("serving on http://%s:%d", f"[{host}]" if ":" in host else host, port)
        return await _wait_for_exit(engine)
    finally:
        await runner.cleanup()  # stops the engine


async def _wait_for_exit(engine: Engine) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        while not stop.is_set():
            if not engine.is_healthy():
                log.error("engine is no longer running; shutting down")
                return 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ENGINE_WATCH_INTERVAL_S):
                    await stop.wait()
        log.info("shutting down")
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def serve(config: ServerConfig, make_engine: Callable[[], Engine]) -> int:
    """Run the server on a fresh event loop (uvloop when installed); returns the exit status.

    The engine is built inside the loop, so whatever it creates binds to that loop.
    """

    async def main() -> int:
        return await serve_async(config, make_engine())

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
