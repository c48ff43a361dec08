"""The aiohttp application: route table, middlewares, engine lifetime, and `serve()`.

`build_app` wires an Engine into routes; it starts/stops the engine only when it owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from lorasrv import __version__
from lorasrv.config import ServerConfig
from lorasrv.engine.engine import Engine
from lorasrv.http import admin, handlers, openai
from lorasrv.http.access_log import RedactingAccessLogger
from lorasrv.http.bodies import MAX_BODY_KEY, RAW_BODIES_KEY
from lorasrv.http.metrics import count_requests, metrics
from lorasrv.http.middleware import Access, auth_middleware, error_middleware
from lorasrv.http.openapi import openapi_json
from lorasrv.http.shutdown import FINISH_WRITING_S, SIGNALS, shut_down
from lorasrv.http.state import CONFIG_KEY, CREATED_KEY, ENGINE_KEY
from lorasrv.http.stats_log import log_stats

log = logging.getLogger(__name__)

#: request bodies beyond this are refused with 413 (a batch of long prompts fits easily)
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
ENGINE_WATCH_INTERVAL_S: Final = 1.0


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


ROUTES: Final[tuple[tuple[str, str, Handler, Access], ...]] = (
    ("POST", "/generate", handlers.generate, Access.USER),
    # ADMIN: a rid is guessable and abort_all ends every tenant's requests.
    ("POST", "/abort_request", handlers.abort_request, Access.ADMIN),
    ("POST", "/tokenize", handlers.tokenize, Access.USER),
    ("POST", "/detokenize", handlers.detokenize, Access.USER),
    ("POST", "/load_lora_adapter", admin.load_lora_adapter, Access.ADMIN),
    ("POST", "/unload_lora_adapter", admin.unload_lora_adapter, Access.ADMIN),
    ("POST", "/flush_cache", admin.flush_cache, Access.ADMIN),
    ("GET", "/flush_cache", admin.flush_cache, Access.ADMIN),  # SGLang's older method
    ("POST", "/v1/load_lora_adapter", admin.vllm_load_lora_adapter, Access.ADMIN),
    ("POST", "/v1/unload_lora_adapter", admin.vllm_unload_lora_adapter, Access.ADMIN),
    ("GET", "/v1/models", handlers.list_models, Access.USER),
    ("GET", "/v1/models/{model_id}", openai.retrieve_model, Access.USER),
    ("POST", "/v1/completions", openai.completions, Access.USER),
    ("POST", "/v1/chat/completions", openai.chat_completions, Access.USER),
    ("GET", "/metrics", metrics, Access.USER),
    ("GET", "/health", handlers.health, Access.OPEN),
    ("GET", "/health_generate", handlers.health_generate, Access.USER),
    ("GET", "/get_model_info", handlers.get_model_info, Access.USER),
    ("GET", "/get_server_info", handlers.get_server_info, Access.USER),
    ("GET", "/server_info", handlers.get_server_info, Access.USER),  # SGLang's newer name
    ("GET", "/openapi.json", openapi_json, Access.OPEN),
    ("GET", "/version", version, Access.USER),
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
    app[MAX_BODY_KEY] = client_max_size
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
    """The runner `serve` uses. NOTE: handler_cancellation makes a disconnect abort a request;
    bodies arrive still encoded, so the routes answer a bad Content-Encoding (http/bodies.py);
    handlers are only waited for briefly at cleanup: `shut_down` has drained them before."""
    app[RAW_BODIES_KEY] = True
    return web.AppRunner(
        app,
        handler_cancellation=True,
        auto_decompress=False,
        shutdown_timeout=FINISH_WRITING_S,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
        access_log_class=RedactingAccessLogger,
    )


async def serve_async(
    config: ServerConfig, engine: Engine, sockets: Sequence[socket.socket] = ()
) -> int:
    """Serve until SIGINT/SIGTERM (0) or until the engine dies (1); always stops the engine.

    `sockets` (from `listen.bind_sockets`, bound before the model loads) replace host and port.
    """
    runner = make_runner(build_app(config, engine, manage_engine=True))
    await runner.setup()  # starts the engine
    stats_task = None
    try:
        sites: list[web.BaseSite] = [web.SockSite(runner, sock) for sock in sockets]
        for site in sites or [web.TCPSite(runner, config.http.host, config.http.port)]:
            await site.start()
        for address in runner.addresses:
            host, port = address[0], address[1]
            log.info("serving on http://%s:%d", f"[{host}]" if ":" in host else host, port)
        if config.http.log_stats_interval > 0:
            stats = log_stats(engine, config.http.log_stats_interval)
            stats_task = asyncio.create_task(stats, name="lorasrv-stats-log")
        return await _wait_for_exit(engine)
    finally:
        if stats_task is not None:
            stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stats_task
        await shut_down(runner, engine, config.http.graceful_shutdown_timeout)  # stops the engine


async def _wait_for_exit(engine: Engine) -> int:
    """NOTE: leaves its signal handlers installed: `shut_down` replaces, then removes them."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    while not stop.is_set():
        if not engine.is_healthy():
            log.error("engine is no longer running; shutting down")
            return 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ENGINE_WATCH_INTERVAL_S):
                await stop.wait()
    log.info("shutting down")
    return 0


def serve(
    config: ServerConfig,
    make_engine: Callable[[], Engine],
    sockets: Sequence[socket.socket] = (),
) -> int:
    """Run the server on a fresh event loop (uvloop when installed); returns the exit status.

    The engine is built inside the loop, so whatever it creates binds to that loop.
    """

    async def main() -> int:
        return await serve_async(config, make_engine(), sockets)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
