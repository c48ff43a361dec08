"""Listening sockets bound before the model loads, so a taken port fails at once, not minutes later.

Binds every address `host` resolves to (as asyncio would), on one port, and listens at once: with
SO_REUSEADDR a bound socket alone does not keep another server off the port. Clients that connect
while the model loads wait in the backlog. Never imports the engine.
"""

from __future__ import annotations

import errno
import socket

from lorasrv.errors import ConfigError

BACKLOG = 128  # asyncio's default for create_server


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening TCP sockets for `host:port`; ConfigError naming the flag."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # dedupe, keep order
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            sock.listen(BACKLOG)
            port = sock.getsockname()[1]  # port 0: every address gets the one picked first
    except OSError as exc:
        for sock in sockets:
            sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            why = "address already in use (another server? pick one with --port)"
        else:
            why = (exc.strerror or str(exc)).lower()
        raise ConfigError(f"cannot listen on {shown}: {why}") from None
    return sockets
