"""Sinks through which actors hand results to the Engine: the per-request output queues and the
admin-operation futures. Protocols only, so actors never hold queues or futures of their own.
"""

from __future__ import annotations

from typing import Protocol

from lorasrv.messages import AdapterOpDone, CacheFlushed, RequestOutput


class OutputSink(Protocol):
    def put_output(self, output: RequestOutput) -> None:
        """Deliver one output delta to the request's consumer; unknown ids are dropped."""


class OpSink(Protocol):
    def op_done(self, result: AdapterOpDone) -> None:
        """Complete the admin operation `result.op_id`; unknown ids are dropped."""


class CacheSink(Protocol):
    def cache_flushed(self, result: CacheFlushed) -> None:
        """Complete the cache flush `result.op_id`; unknown ids are dropped."""
