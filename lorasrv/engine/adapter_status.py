"""One adapter version's status as its three owners see it: the catalog's phase, the host
cache's state, the scheduler's GPU rows; and the one label derived from them. Pure.
"""

from __future__ import annotations

import msgspec

from lorasrv.engine.adapter_catalog import AdapterVersion
from lorasrv.engine.host_cache import HostState
from lorasrv.engine.stats import GpuAdapter
from lorasrv.messages import AdapterStatus


def status_of(version: AdapterVersion, host: HostState | None) -> AdapterStatus:
    """The adapter manager's view (no GPU rows: `with_gpu` adds the scheduler's)."""
    status = AdapterStatus(
        name=version.name,
        path=version.path,
        adapter_id=version.adapter_id,
        state="",
        phase=version.phase.value,
        host="absent" if host is None else host.value,
        rank=version.rank,
        pinned=version.pinned,
        num_refs=len(version.refs),
        num_loads=version.num_loads,
        num_host_drops=version.num_host_drops,
        last_load_s=version.last_load_s,
    )
    return msgspec.structs.replace(status, state=status_label(status))


def with_gpu(status: AdapterStatus, gpu: GpuAdapter) -> AdapterStatus:
    """`status` with the scheduler's view of its GPU rows."""
    status = msgspec.structs.replace(status, gpu_rows=gpu.num_rows, num_evictions=gpu.num_evictions)
    return msgspec.structs.replace(status, state=status_label(status))


def status_label(status: AdapterStatus) -> str:
    """The one state label of a version: its phase while loading or unloading, then where it
    is furthest along (GPU rows, a host copy, or only registered)."""
    if status.phase in ("loading", "unloading"):
        return status.phase
    if status.gpu_rows:
        return "gpu_resident"
    return {"loading": "loading", "loaded": "cpu_loaded"}.get(status.host, "unloaded")
