"""Adapter references, loads and unloads, host copies; admin operations (cache flush)."""

import msgspec

from lorasrv.ids import AdapterId, OpId, RequestId
from lorasrv.messages.base import Msg


class AcquireAdapter(Msg, frozen=True, kw_only=True):
    """SchedulerActor -> AdapterManagerActor: the request wants a reference to `lora_name`."""

    request_id: RequestId
    lora_name: str


class AdapterAcquired(Msg, frozen=True, kw_only=True):
    """AdapterManagerActor -> SchedulerActor: the request holds a reference to `adapter_id`.

    NOTE: sent after the adapter's HostCopyReady went to the runner, so a plan may upload it.
    """

    request_id: RequestId
    adapter_id: AdapterId
    rank: int = 0  # LoRA rows the adapter needs on the GPU (its max rank over modules)
    pinned: bool = False  # fixed for the adapter id's lifetime


class AdapterAcquireFailed(Msg, frozen=True, kw_only=True):
    request_id: RequestId
    code: str
    detail: str


class ReleaseAdapter(Msg, frozen=True, kw_only=True):
    """Exactly once per acquired request: on finish, abort or error."""

    request_id: RequestId
    adapter_id: AdapterId


class LoadAdapter(Msg, frozen=True, kw_only=True):
    """Engine -> AdapterManagerActor (admin API or startup)."""

    op_id: OpId
    lora_name: str
    lora_path: str
    pinned: bool = False


class UnloadAdapter(Msg, frozen=True, kw_only=True):
    op_id: OpId
    lora_name: str


class DescribeAdapters(Msg, frozen=True, kw_only=True):
    op_id: OpId
    # Only the live versions of these names (a load or unload checks one name: O(1), not
    # O(registered)); None: every version.
    names: tuple[str, ...] | None = None


class AdapterStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One adapter version as its three owners see it: the catalog (`phase`), the host cache
    (`host`) and the scheduler's GPU residency (`gpu_rows`, filled in by the Engine), and one
    label derived from the three (`state`)."""

    name: str
    path: str
    adapter_id: AdapterId
    # "loading" (first load or a reload) | "unloading" | "gpu_resident" | "cpu_loaded" (host
    # copy, no GPU rows) | "unloaded" (registered, neither: read back from disk on first use)
    state: str
    phase: str  # "loading" (first load) | "ready" | "unloading" (draining its requests)
    host: str  # "absent" | "loading" | "loaded": its host copy
    rank: int
    pinned: bool
    num_refs: int
    gpu_rows: int = 0  # LoRA rows it holds on the GPU; 0 = not resident
    num_loads: int = 0  # host loads (first load and reloads)
    num_evictions: int = 0  # times its GPU rows were taken for others
    num_host_drops: int = 0  # host copies dropped by --max-loaded-loras
    last_load_s: float = 0.0


class AdapterOpDone(msgspec.Struct, frozen=True, kw_only=True):
    """AdapterManagerActor -> engine: the answer to LoadAdapter / UnloadAdapter / Describe."""

    op_id: OpId
    success: bool
    error_message: str = ""
    loaded_adapters: dict[str, str] = msgspec.field(default_factory=dict)
    adapters: tuple[AdapterStatus, ...] = ()


class AdapterRetired(Msg, frozen=True, kw_only=True):
    """AdapterManagerActor -> SchedulerActor: removed for good (unloaded, and no request holds it
    any more); the planner frees its GPU rows. Its id is never used again."""

    adapter_id: AdapterId


class HostCopy(msgspec.Struct, frozen=True, kw_only=True):
    """An adapter read into host memory, as the loader thread hands it back."""

    weights: object  # model-side host copy (packed rows); opaque to the engine
    rank: int
    scaling: float
    load_s: float


class HostLoadDone(Msg, frozen=True, kw_only=True):
    """AdapterManagerActor -> itself: an adapter folder finished (or failed) loading to host."""

    adapter_id: AdapterId
    copy: HostCopy | None = None
    error: str | None = None


class FlushCache(Msg, frozen=True, kw_only=True):
    """Engine -> SchedulerActor: drop every cached KV page no request uses (/flush_cache)."""

    op_id: OpId


class CacheFlushed(msgspec.Struct, frozen=True, kw_only=True):
    """SchedulerActor -> engine: the answer to FlushCache."""

    op_id: OpId
    num_pages: int  # cached pages dropped
