"""Decode steps on static buffers, bucketed by batch size and replayed as CUDA graphs.

Owns the static inputs, the per-bucket graphs and their shared memory pool; prefill and mixed
steps never come here. A bucket runs the same kernels replayed or eager, so outputs match.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

from lorasrv.ids import AdapterId
from lorasrv.messages import StepPlan
from lorasrv.model.attention import AttentionMetadata, KvCache
from lorasrv.model.batch import check_pages
from lorasrv.model.llama import LlamaModel
from lorasrv.model.lora_backend import AdapterInfo, LoraBackend, LoraStep, lora_segments

if TYPE_CHECKING:
    from lorasrv.model.hot_cache import HotCache

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def buckets_up_to(max_batch_size: int) -> tuple[int, ...]:
    return tuple(sorted({b for b in BUCKETS if b < max_batch_size} | {max_batch_size}))


# A decode graph's LoRA: none (every row base), the row kernels, or stacked over the hot A
# cache's `[W; A_hot]` buffers (hot_cache.py).
Variant = Literal["base", "rows", "hot"]


class DecodeLora(NamedTuple):
    """What decode needs of the runner's LoRA: the backend, each adapter's rank and scaling
    (the runner's live table), how many row entries a step can name at most, and the hot A
    cache when the runner keeps one."""

    backend: LoraBackend
    adapters: Mapping[AdapterId, AdapterInfo]
    max_row_entries: int
    hot: HotCache | None = None


class DecodeRunner:
    """Runs decode plans of up to `max_batch_size` rows on static buffers.

    A plan of n rows runs in the smallest bucket b >= n; rows n..b-1 are padding (token 0,
    one context token, slot -1 so they store no K/V, in no LoRA segment). The LoRA metadata
    lives in static buffers sized for the worst case (every row its own adapter of the largest
    rank) and holds the step's exact segments and work lists, so one graph serves any mix of
    adapters and ranks and the kernels do only the step's work. Up to three graphs per
    bucket: without LoRA, with the row kernels, and stacked (a step whose adapters the hot A
    cache holds).
    """

    def __init__(
        self,
        *,
        model: LlamaModel,
        kv_cache: KvCache,
        lora: DecodeLora | None,
        max_batch_size: int,
        max_pages_per_seq: int,
        device: torch.device,
    ) -> None:
        self.model, self.kv_cache, self.lora = model, kv_cache, lora
        self.device = device
        self.page_size = kv_cache.page_size
        self.num_pages = kv_cache.num_pages
        self.buckets = buckets_up_to(max_batch_size)
        self.max_pages = max_pages_per_seq
        b_max = self.buckets[-1]
        self._lora_buffers = None
        if lora is not None:
            self._lora_buffers = lora.backend.static_buffers(
                max_tokens=b_max, max_row_entries=lora.max_row_entries, device=device
            )
        # One int32 buffer, one upload: ids | positions | slot mapping | kv_lens
        self._header_len = 4 * b_max
        self._header = torch.zeros(self._header_len, dtype=torch.int32, device=device)
        self._tables = torch.zeros(b_max, self.max_pages, dtype=torch.int32, device=device)
        self._landing = torch.empty(0, dtype=torch.int32, device=device)  # tables on the way
        self._query_start = torch.arange(b_max + 1, dtype=torch.int32, device=device)
        self._sample_index = torch.arange(b_max, dtype=torch.int64, device=device)
        self._staging = torch.empty(0, dtype=torch.int32)
        self._upload_done: torch.cuda.Event | None = None
        self._graphs: dict[tuple[int, Variant], torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None  # [b_max, vocab] float32, graph output
        self.use_graphs = False  # set by capture(); False runs the same buckets eagerly

    # ------------------------------------------------------------------ per step

    def can_run(self, plan: StepPlan) -> bool:
        """Decode plan that fits: rows <= the largest bucket, pages, LoRA row entries."""
        num_rows = len(plan.seq_ids)
        if not plan.is_decode or num_rows > self.buckets[-1]:
            return False
        if max(plan.context_lens) // self.page_size >= self.max_pages:
            return False
        if all(index < 0 for index in plan.lora_adapters):
            return True
        if self.lora is None:
            return False  # the eager path reports the misconfiguration
        # Each segment lists its adapter's rows: past the bound only when rows are unsorted.
        runs = [
            i for n, i in enumerate(plan.lora_adapters) if n == 0 or i != plan.lora_adapters[n - 1]
        ]
        entries = sum(len(plan.adapters[i].rows) for i in runs if i >= 0)
        return entries <= self.lora.max_row_entries

    def run(
        self,
        plan: StepPlan,
        fill_inputs: Callable[[torch.Tensor], None] | None = None,
        page_limit: int | None = None,
    ) -> torch.Tensor:
        """Logits `[num_rows, vocab]` float32 of a decode plan (valid until the next step).

        `fill_inputs(ids)` may overwrite rows of the static input ids `[num_rows]` on the device
        after the plan's upload (its `device_inputs`: tokens the host does not have yet).
        `page_limit`: the lowest page under the plan's LoRA rows (its pages must lie below).
        """
        num_rows = len(plan.seq_ids)
        bucket = self._bucket(num_rows)
        variant = self._fill_lora(plan)
        self._upload(plan, page_limit)
        if fill_inputs is not None:
            fill_inputs(self._views()[0][:num_rows])  # queued after the header upload
        graph = self._graphs.get((bucket, variant)) if self.use_graphs else None
        if graph is None:
            return self._forward(bucket, variant)[:num_rows]
        graph.replay()
        assert self._logits is not None
        return self._logits[:num_rows]

    # ------------------------------------------------------------------ capture

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (largest first, one shared pool); CUDA only."""
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        started = time.monotonic()
        variants: tuple[Variant, ...] = ("base",)
        if self.lora is not None:
            variants += ("rows", "hot") if self.lora.hot is not None else ("rows",)
        vocab = self.model.lm_head.shape[0]
        self._logits = torch.empty(self.buckets[-1], vocab, dtype=torch.float32, device=self.device)
        mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        for bucket in reversed(self.buckets):
            for variant in variants:
                self._fill_padding()
                # Warm-up off the capture: Triton compiles, cuBLAS picks its kernels.
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward(bucket, variant)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA calls (pinning a host buffer) cannot break it
                with torch.cuda.graph(graph, pool=mempool, capture_error_mode="thread_local"):
                    logits = self._forward(bucket, variant)
                    self._logits[:bucket].copy_(logits)
                self._graphs[bucket, variant] = graph
        torch.cuda.synchronize(self.device)
        self.use_graphs = True
        logger.info(
            "captured %d decode graphs (batch buckets %s) in %.1fs",
            len(self._graphs),
            ",".join(map(str, self.buckets)),
            time.monotonic() - started,
        )

    # ------------------------------------------------------------------ internals

    def _bucket(self, num_rows: int) -> int:
        return next(b for b in self.buckets if b >= num_rows)

    def _views(self) -> tuple[torch.Tensor, ...]:
        """ids, positions, slot_mapping, kv_lens (full length)."""
        return tuple(self._header.split_with_sizes([self.buckets[-1]] * 4))

    def _fill_lora(self, plan: StepPlan) -> Variant:
        """The step's segments into the static LoRA buffers (the hot A cache's columns when it
        runs stacked); which graph runs it."""
        if self.lora is None or self._lora_buffers is None:
            return "base"
        segments = lora_segments(plan, [1] * len(plan.seq_ids), self.lora.adapters)
        if segments is None:
            return "base"
        variant: Variant = "rows"
        if self.lora.hot is not None:
            stacked = self.lora.hot.place(plan, segments, len(plan.seq_ids))
            if stacked is not None:
                segments, variant = stacked, "hot"
        self._lora_buffers.fill(
            segments.seg_lens, segments.seg_rows, segments.seg_scaling, segments.seg_v_col
        )
        return variant

    def _forward(self, bucket: int, variant: Variant) -> torch.Tensor:
        ids, positions, slots, kv_lens = self._views()
        metadata = AttentionMetadata(
            positions=positions[:bucket],
            slot_mapping=slots[:bucket],
            block_tables=self._tables[:bucket],
            query_start=self._query_start[: bucket + 1],
            kv_lens=kv_lens[:bucket],
            num_rows=bucket,
            max_query_len=1,
            max_kv_len=self.max_pages * self.page_size,  # a bound: replays see any length
            dense=None,
        )
        lora = None
        if variant != "base" and self.lora is not None and self._lora_buffers is not None:
            # NOTE: the views never move; the grids are sized for the bucket, the work follows
            # the counts that `_fill_lora` wrote.
            hot = self.lora.hot
            backend = hot.backend if variant == "hot" and hot is not None else self.lora.backend
            lora = LoraStep(backend, self._lora_buffers.info(bucket))
        return self.model.forward(
            ids[:bucket], metadata, self.kv_cache, lora, self._sample_index[:bucket]
        )

    def _fill_padding(self) -> None:
        """Every row padding: nothing is stored, attention reads one token of page 0, no LoRA
        segment (the LoRA buffers start empty and stay so until a step fills them)."""
        b_max = self.buckets[-1]
        header = [0] * (2 * b_max) + [-1] * b_max + [1] * b_max
        self._header.copy_(torch.tensor(header, dtype=torch.int32))

    def _upload(self, plan: StepPlan, page_limit: int | None) -> None:
        """Host lists -> one pinned int32 staging buffer -> the static buffers (3 copies)."""
        b_max, page_size = self.buckets[-1], self.page_size
        num_rows = len(plan.seq_ids)
        pad = b_max - num_rows
        context_lens = plan.context_lens
        num_cols = max(context_lens) // page_size + 1  # pages holding context + the new token
        slot_mapping: list[int] = []
        tables: list[int] = []
        for table, ctx in zip(plan.block_tables, context_lens, strict=True):
            used = ctx // page_size + 1
            if len(table) < used:
                raise ValueError("a block table does not cover its row's context + new token")
            slot_mapping.append(table[ctx // page_size] * page_size + ctx % page_size)
            tables.extend(table[:used])
            tables.extend([0] * (num_cols - used))
        if tables:
            check_pages(min(tables), max(tables), self.num_pages, page_limit)
        header = [*plan.input_ids, *[0] * pad, *context_lens, *[0] * pad]
        header += [*slot_mapping, *[-1] * pad, *(c + 1 for c in context_lens), *[1] * pad]
        total = self._header_len + len(tables)
        staging = self._staging_for(total)
        staging[:total] = torch.tensor(header + tables, dtype=torch.int32)
        non_blocking = self.device.type == "cuda"
        self._header.copy_(staging[: self._header_len], non_blocking=non_blocking)
        if self._landing.numel() < len(tables):
            self._landing = torch.empty(
                b_max * self.max_pages, dtype=torch.int32, device=self.device
            )
        landing = self._landing[: len(tables)]
        landing.copy_(staging[self._header_len : total], non_blocking=non_blocking)
        self._tables[:num_rows, :num_cols].copy_(landing.view(num_rows, num_cols))
        if non_blocking:
            self._upload_done = torch.cuda.current_stream(self.device).record_event()

    def _staging_for(self, total: int) -> torch.Tensor:
        if self._upload_done is not None:
            # NOTE: the previous step's copy may still be reading the staging buffer.
            self._upload_done.synchronize()
        if self._staging.numel() < total:
            pinned = self.device.type == "cuda"
            size = max(total, 2 * self._staging.numel())
            self._staging = torch.empty(size, dtype=torch.int32, pin_memory=pinned)
        return self._staging
