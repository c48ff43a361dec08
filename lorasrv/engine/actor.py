"""Actor base: an inbox, a run loop that handles one message at a time, and a stop.

An actor owns its state; others reach it only through `send`. An exception escaping `handle` is a
bug: it propagates out of `run`, and the Engine's TaskGroup cancels everything.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Generic, Protocol, TypeVar

M = TypeVar("M")
M_contra = TypeVar("M_contra", contravariant=True)

logger = logging.getLogger(__name__)


class Sender(Protocol[M_contra]):
    """A peer actor (or a test fake): `send` never blocks."""

    def send(self, msg: M_contra, /) -> None: ...


class Actor(Generic[M]):
    """Subclasses implement `handle(msg)` (synchronous, short) and may override `on_start`."""

    name: str = "actor"

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[M] = asyncio.Queue()

    def send(self, msg: M) -> None:
        """Never blocks: inboxes are unbounded; ingress is bounded at the Engine."""
        self.inbox.put_nowait(msg)

    async def on_start(self) -> None:
        """Runs once inside `run` before the first message."""

    def handle(self, msg: M) -> None:
        raise NotImplementedError

    def after_batch(self) -> None:
        """Runs after the inbox has been drained (e.g. plan the next step once per wake-up)."""

    async def run(self) -> None:
        await self.on_start()
        while True:
            msg = await self.inbox.get()
            self.handle(msg)
            # Drain what is already queued before `after_batch`, so a burst of messages costs
            # one planning pass, not one per message.
            while not self.inbox.empty():
                self.handle(self.inbox.get_nowait())
            self.after_batch()
