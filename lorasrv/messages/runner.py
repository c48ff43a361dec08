"""The scheduler's steps to the GPU runner and their results; what the runner measured
at startup."""

import msgspec

from lorasrv.ids import AdapterId, BlockId, SeqId, StepId
from lorasrv.messages.base import Msg, SamplingParams, TokenLogprob


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
