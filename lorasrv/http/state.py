"""The app's typed state keys: the Engine the routes talk to, the config, the creation time."""

from __future__ import annotations

from aiohttp import web

from lorasrv.config import ServerConfig
from lorasrv.engine.engine import Engine

ENGINE_KEY = web.AppKey("engine", Engine)
CONFIG_KEY = web.AppKey("config", ServerConfig)
CREATED_KEY = web.AppKey("created", int)  # unix time the app was built: /v1/models "created"
