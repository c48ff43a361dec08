"""The runner's LoRA side: the row pool over the arena, the host copies and their uploads, the
backend; what a plan's LoRA fields (`uploads`, `adapters`, `lora_adapters`) turn into.

Built by ModelRunner when LoRA is on; decides nothing about residency (the plan says it all).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorasrv.ids import AdapterId
from lorasrv.messages import HostCopyReady, StepPlan
from lorasrv.model.adapter_loader import load_adapter
from lorasrv.model.arch import ModelArch
from lorasrv.model.arena import Arena
from lorasrv.model.cuda_graphs import DecodeLora
from lorasrv.model.hot_cache import HotCache
from lorasrv.model.llama import LlamaModel
from lorasrv.model.lora_backend import LoraBackend, LoraStep, lora_segments
from lorasrv.model.lora_layout import HostAdapter, RowLayout, pack_rows
from lorasrv.model.lora_pool import LoraPool
from lorasrv.model.uploads import Uploader


class LoraRuntime:
    """Row views of the arena attached to the model's targeted linears, plus the uploader."""

    def __init__(
        self,
        arena: Arena,
        layout: RowLayout,
        model: LlamaModel,
        backend: LoraBackend,
        *,
        max_rank: int,
        device: torch.device,
        hot: HotCache | None = None,
    ) -> None:
        rows = arena.rows
        if rows is None or arena.geometry.max_rows < max_rank:
            raise ValueError(
                f"the arena ({arena.num_bytes} bytes) holds fewer LoRA rows than one adapter of "
                f"rank {max_rank} needs ({layout.row_elems} elements each); give it more memory "
                "(--mem-fraction-static, --kv-cache-bytes) or lower --max-lora-rank"
            )
        self.pool = LoraPool(rows, layout)
        for layer, name, linear in model.lora_linears():
            module = self.pool.module(layer, name)
            if module is not None and hot is not None:
                module = module._replace(hot=hot.modules.get((layer, name)))
            linear.lora = module
        self.uploader = Uploader(self.pool, device)
        # Steps whose adapters fit it run stacked (hot_cache.py); the runner alone decides.
        self.hot = hot
        if hot is not None:
            hot.attach(self.pool, self.uploader)
        self.geometry = arena.geometry
        self.backend = backend
        self.max_rank = max_rank
        self.device = device

    def add_host_copy(self, copy: HostCopyReady) -> None:
        self.uploader.add(copy.adapter_id, copy.weights, copy.rank, copy.scaling)

    def drop_host_copy(self, adapter_id: AdapterId) -> None:
        self.uploader.drop(adapter_id)

    def before_compute(self, plan: StepPlan) -> int | None:
        """A plan's adapters checked and the compute stream made to wait for their rows; returns
        the plan's page limit (`page_limit`)."""
        if plan.lora_adapters and (
            len(plan.lora_adapters) != len(plan.seq_ids)
            or max(plan.lora_adapters) >= len(plan.adapters)
        ):
            raise ValueError("plan.lora_adapters must give each row an index into plan.adapters")
        self.uploader.check_rows(plan.adapters)
        self.uploader.wait(plan)
        return self.page_limit(plan)

    def page_limit(self, plan: StepPlan) -> int | None:
        """The lowest page under the rows this plan names (uses or uploads): its KV pages must
        lie below. None when it names no rows."""
        lowest = min((min(e.rows) for e in (*plan.adapters, *plan.uploads) if e.rows), default=None)
        return None if lowest is None else self.geometry.pages_of_row(lowest).start

    def step(self, plan: StepPlan) -> LoraStep | None:
        """An eager step's LoRA (metadata sized exactly); None when every row is base."""
        segments = lora_segments(plan, plan.query_lens, self.uploader.info)
        if segments is None:
            return None
        # NOTE: decode steps only. Prefill and mixed steps ran 3x slower stacked than on the row
        # kernels (H100, bench_many zipf64 at be09855: its 16 prefill steps 2.88 s vs 0.97 s
        # with --lora-hot-rows 0; decode steps equal), so they take the row kernels.
        if self.hot is not None and plan.is_decode:
            stacked = self.hot.place(plan, segments, sum(plan.query_lens))
            if stacked is not None:
                return LoraStep(self.hot.backend, self.hot.backend.prepare(stacked, self.device))
        return LoraStep(self.backend, self.backend.prepare(segments, self.device))

    def decode_lora(self, max_batch_size: int) -> DecodeLora:
        """What the static decode path needs: at most every row's worth of row entries (a step
        names each adapter's rows once when its rows are sorted), and never more than exist."""
        entries = min(max_batch_size * self.max_rank, self.pool.max_rows)
        return DecodeLora(self.backend, self.uploader.info, entries, self.hot)

    def make_loader(
        self,
        arch: ModelArch,
        target_modules: tuple[str, ...],
        dtype: torch.dtype,
        *,
        allow_pickle: bool,
    ) -> Callable[[str], HostAdapter]:
        """A CPU-only, thread-safe loader: adapter folder -> its host copy in this pool's rows."""
        layout, rank, pin = self.pool.layout, self.max_rank, self.device.type == "cuda"

        def load(path: str) -> HostAdapter:
            weights = load_adapter(
                path,
                arch=arch,
                max_rank=rank,
                target_modules=target_modules,
                allow_pickle=allow_pickle,
                dtype=dtype,
            )
            return pack_rows(weights, layout, pin_memory=pin)

        return load
