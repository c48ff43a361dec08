"""Every Struct that crosses an actor queue, and one union per inbox.

Messages carry ids and values, never queues, futures or callbacks, so an actor could move to another
process with msgspec.msgpack. Only `HostCopyReady.weights` carries (CPU) tensors, opaque to the
engine; the sender drops its reference after sending.
"""

import msgspec

from lorasrv.ids import AdapterId, BlockId, OpId, RequestId, SeqId, StepId


class Msg(msgspec.Struct, frozen=True, tag=True):
    """Immutable, tagged with the class name. Subclasses add kw_only=True (not inherited)."""


# ----------------------------------------------------------------------------- requests


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """SGLang's sampling_params. Field checks beyond types live in `engine.validation`."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = disabled
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    skip_special_tokens: bool = True
    logprobs: bool = False  # return the sampled token's logprob
    top_logprobs: int = 0  # and this many alternatives per position


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    content: str


class Tokenize(Msg, frozen=True, kw_only=True):
    """Engine -> TokenizerActor: one request, as the client gave it."""

    request_id: RequestId
    text: str | None = None
    input_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None  # chat: rendered with the chat template
    lora_name: str | None = None
    params: SamplingParams


class Tokenized(Msg, frozen=True, kw_only=True):
    """TokenizerActor -> itself: a long prompt encoded off the event loop (ids, or why not)."""

    request_id: RequestId
    prompt_ids: tuple[int, ...] = ()
    error: str | None = None


class Enqueue(Msg, frozen=True, kw_only=True):
    """TokenizerActor -> SchedulerActor: a tokenized request ready for admission."""

    request_id: RequestId
    prompt_ids: tuple[int, ...]
    lora_name: str | None
    params: SamplingParams


class Abort(Msg, frozen=True, kw_only=True):
    """Client gone or request finished elsewhere (stop string): free everything it holds."""

    request_id: RequestId


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    logprob: float


class EmitTokens(Msg, frozen=True, kw_only=True):
    """SchedulerActor -> TokenizerActor: new token ids of one request, maybe its end."""

    request_id: RequestId
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: int | None = None  # the stop token id that ended it
    prompt_tokens: int = 0
    cached_tokens: int = 0


class RequestFailed(Msg, frozen=True, kw_only=True):
    """Any actor -> TokenizerActor (or the engine): the request ends with an error."""

    request_id: RequestId
    code: str  # errors.LorasrvError.code
    detail: str


class RequestOutput(msgspec.Struct, frozen=True, kw_only=True):
    """TokenizerActor -> the request's output queue: a delta of text and ids, maybe the last."""

    request_id: RequestId
    text: str  # new text since the previous output
    token_ids: tuple[int, ...]  # new ids since the previous output
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()
    finished: bool = False
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error_code: str | None = None
    error_detail: str | None = None


# ----------------------------------------------------------------------------- adapters


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


# ----------------------------------------------------------------------------- prefix cache


class FlushCache(Msg, frozen=True, kw_only=True):
    """Engine -> SchedulerActor: drop every cached KV page no request uses (/flush_cache)."""

    op_id: OpId


class CacheFlushed(msgspec.Struct, frozen=True, kw_only=True):
    """SchedulerActor -> engine: the answer to FlushCache."""

    op_id: OpId
    num_pages: int  # cached pages dropped


# ----------------------------------------------------------------------------- GPU runner


class NewSeq(msgspec.Struct, frozen=True, kw_only=True):
    """A sequence entering the runner's table (first prefill chunk, or recompute)."""

    seq_id: SeqId
    params: SamplingParams
    prompt_ids: tuple[int, ...]  # for repetition penalty
    output_ids: tuple[int, ...] = ()  # already generated (recompute after preemption)


class AdapterRows(msgspec.Struct, frozen=True, array_like=True):
    """Where one adapter lives in the arena: its physical LoRA rows, `len(rows)` == its rank.

    Row i holds the adapter's rank-vector i (A's row i, B's column i) for every layer and module;
    the rows need not be contiguous.
    """

    adapter_id: AdapterId
    rows: tuple[int, ...]


class StepPlan(Msg, frozen=True, kw_only=True):
    """SchedulerActor -> GpuRunnerActor: one forward step, built once on the host.

    Rows are sorted by `lora_adapters` (base rows, -1, first; then by index into `adapters`) so
    each adapter is one segment.
    """

    step_id: StepId
    new_seqs: tuple[NewSeq, ...] = ()
    freed_seq_ids: tuple[SeqId, ...] = ()  # finished, aborted or preempted: drop runner state
    seq_ids: tuple[SeqId, ...] = ()  # one per row
    input_ids: tuple[int, ...] = ()  # the rows' new tokens, concatenated
    query_lens: tuple[int, ...] = ()  # new tokens per row
    context_lens: tuple[int, ...] = ()  # tokens already in the KV cache per row
    block_tables: tuple[tuple[BlockId, ...], ...] = ()  # KV pages per row, covering all tokens
    # Per row: index into `adapters`, -1 = base model.
    lora_adapters: tuple[int, ...] = ()
    adapters: tuple[AdapterRows, ...] = ()  # every adapter this step's rows use, with its rows
    # Write these adapters' host copies into these rows before the step's compute. May name
    # adapters the step does not use (prefetch for queued requests): the step waits only on the
    # uploads of adapters it uses. Never rows that the previous plan's adapters hold.
    uploads: tuple[AdapterRows, ...] = ()
    sample_rows: tuple[bool, ...] = ()  # the row yields a token (decode or last prefill chunk)
    # Per row (empty: none): its one new token is the token its sequence sampled last, which the
    # host does not have yet (the overlap schedule plans a step before the previous one's tokens
    # are back); `input_ids` holds 0 there and the runner reads the token on the device.
    device_inputs: tuple[bool, ...] = ()

    @property
    def is_decode(self) -> bool:
        """Every row feeds one token and samples one (the steps CUDA graphs serve)."""
        return bool(self.seq_ids) and all(n == 1 for n in self.query_lens) and all(self.sample_rows)


class HostCopyReady(Msg, frozen=True, kw_only=True):
    """AdapterManagerActor -> GpuRunnerActor: the adapter's host copy, ready to upload into rows.

    Sent before the AdapterAcquired that lets a plan name the adapter. The runner keeps `rank`
    and `scaling` per adapter id even after HostCopyDropped (its rows may still be resident).
    """

    adapter_id: AdapterId
    weights: object  # model-side host copy (packed rows, pinned); opaque to the engine
    rank: int
    scaling: float


class HostCopyDropped(Msg, frozen=True, kw_only=True):
    """AdapterManagerActor -> GpuRunnerActor: the host copy is gone (host cap, unload); GPU rows
    are untouched (the planner owns them). No request holds the adapter when this is sent."""

    adapter_id: AdapterId


class RunStep(Msg, frozen=True, kw_only=True):
    plan: StepPlan


class StepResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a StepRunner's `step` returns: one entry per sampled row of the plan, in row order."""

    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()  # empty unless some row asked for logprobs
    top_logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()  # empty unless some row asked


class StepDone(Msg, frozen=True, kw_only=True):
    """GpuRunnerActor -> SchedulerActor: the step's result; `seq_ids` are its sampled rows."""

    step_id: StepId
    seq_ids: tuple[SeqId, ...]
    result: StepResult


class RunnerReady(msgspec.Struct, frozen=True, kw_only=True):
    """What the GPU runner measured at startup; passed explicitly to the other actors.

    The arena: `num_kv_pages * kv_page_bytes` bytes, KV pages from the bottom; `lora_max_rows`
    LoRA rows of `lora_row_bytes` overlay its top (row p starts at byte
    `num_kv_pages * kv_page_bytes - (lora_max_rows - p) * lora_row_bytes`). A page serves KV
    only while no allocated row covers it; the scheduler's planner owns both allocations.
    """

    num_kv_pages: int  # arena units
    page_size: int  # tokens per KV page
    kv_page_bytes: int
    lora_row_bytes: int  # 0 when LoRA is off
    lora_max_rows: int  # 0 when LoRA is off
    max_lora_rank: int
    lora_target_modules: tuple[str, ...]
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]  # config.json / generation_config.json
    device: str
    dtype: str


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
