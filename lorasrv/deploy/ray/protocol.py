"""What crosses between the ingress, the replicas and the adapter registry: frozen msgspec Structs.

Imports neither Ray nor torch, so the ingress, the replicas and the tests share one definition.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from lorasrv.config import ServerConfig
from lorasrv.errors import LorasrvError
from lorasrv.ids import RequestId
from lorasrv.messages import AdapterStatus, RequestOutput, RunnerReady

#: (index of the submission in its group, one of its output deltas)
Tagged = tuple[int, RequestOutput]
REPLICA_GONE: Final = "the replica serving this request stopped before it finished"


class AdapterEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One adapter registered for the whole deployment. A new registration of a name gets a new
    generation, so a replica holding an older version knows to drop it."""

    name: str
    path: str
    pinned: bool = False
    generation: int


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    version: int  # bumped by every registration change
    entries: dict[str, AdapterEntry]


class ReplicaReport(msgspec.Struct, frozen=True, kw_only=True):
    """A replica's heartbeat: liveness, the registry version it has applied, and what /metrics,
    /get_server_info and the admin answers need from it."""

    replica_id: str
    pid: int
    healthy: bool
    applied: int  # registry version whose loads/unloads this replica has carried out
    errors: dict[str, str] = msgspec.field(default_factory=dict)  # adapter -> failure of `applied`
    stats: dict[str, float] = msgspec.field(default_factory=dict)  # SchedulerStats fields
    adapters: tuple[AdapterStatus, ...] = ()
    metrics: bytes = b""  # the replica engine's Prometheus text


class ReplicaInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the ingress learns once from any replica: the facts a started Engine holds (its
    config as the model resolved it, the runner's measurements), so that checks and info routes
    are answered at the ingress as the single server answers them."""

    config: ServerConfig
    model_path: str
    ready: RunnerReady
    tokenizer: Any  # the engine's Detokenizer (HfTokenizer pickles), for checks and /tokenize


def error_output(request_id: str, error: LorasrvError) -> RequestOutput:
    """The last delta of a request that failed: its handle raises `error` again at the ingress."""
    return RequestOutput(
        request_id=RequestId(request_id),
        text="",
        token_ids=(),
        finished=True,
        finish_reason="error",
        error_code=error.code,
        error_detail=error.detail,
    )
