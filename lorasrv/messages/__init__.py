"""Every Struct that crosses an actor queue, and one union per inbox. Defined by route in
`base` (shared parts), `requests`, `adapters` and `runner`; imported from here.

Messages carry ids and values, never queues, futures or callbacks, so an actor could move to another
process with msgspec.msgpack. Only `HostCopyReady.weights` carries (CPU) tensors, opaque to the
engine; the sender drops its reference after sending.
"""

from lorasrv.messages.adapters import (
    AcquireAdapter,
    AdapterAcquired,
    AdapterAcquireFailed,
    AdapterOpDone,
    AdapterRetired,
    AdapterStatus,
    CacheFlushed,
    DescribeAdapters,
    FlushCache,
    HostCopy,
    HostLoadDone,
    LoadAdapter,
    ReleaseAdapter,
    UnloadAdapter,
)
from lorasrv.messages.base import (
    ChatMessage,
    Msg,
    SamplingParams,
    TokenLogprob,
)
from lorasrv.messages.requests import (
    Abort,
    EmitTokens,
    Enqueue,
    RequestFailed,
    RequestOutput,
    Tokenize,
    Tokenized,
)
from lorasrv.messages.runner import (
    AdapterRows,
    HostCopyDropped,
    HostCopyReady,
    NewSeq,
    RunnerReady,
    RunStep,
    StepDone,
    StepPlan,
    StepResult,
)

TokenizerInbox = Tokenize | Tokenized | EmitTokens | RequestFailed | Abort
SchedulerInbox = (
    Enqueue
    | Abort
    | AdapterAcquired
    | AdapterAcquireFailed
    | AdapterRetired
    | StepDone
    | FlushCache
)
AdapterInbox = (
    AcquireAdapter | ReleaseAdapter | LoadAdapter | UnloadAdapter | DescribeAdapters | HostLoadDone
)
RunnerInbox = RunStep | HostCopyReady | HostCopyDropped

__all__ = [
    "Abort",
    "AcquireAdapter",
    "AdapterAcquireFailed",
    "AdapterAcquired",
    "AdapterInbox",
    "AdapterOpDone",
    "AdapterRetired",
    "AdapterRows",
    "AdapterStatus",
    "CacheFlushed",
    "ChatMessage",
    "DescribeAdapters",
    "EmitTokens",
    "Enqueue",
    "FlushCache",
    "HostCopy",
    "HostCopyDropped",
    "HostCopyReady",
    "HostLoadDone",
    "LoadAdapter",
    "Msg",
    "NewSeq",
    "ReleaseAdapter",
    "RequestFailed",
    "RequestOutput",
    "RunStep",
    "RunnerInbox",
    "RunnerReady",
    "SamplingParams",
    "SchedulerInbox",
    "StepDone",
    "StepPlan",
    "StepResult",
    "TokenLogprob",
    "Tokenize",
    "Tokenized",
    "TokenizerInbox",
    "UnloadAdapter",
]
