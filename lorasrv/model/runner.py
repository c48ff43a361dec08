"""ModelRunner: the StepRunner that runs the real model; owns the weights, KV cache and LoRA pool.

Runs on the GPU runner's one thread; every method may block. Never imports asyncio or the engine.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch

from lorasrv.engine.step_runner import DoneStep, PendingStep
from lorasrv.hub import resolve_path
from lorasrv.ids import AdapterId, SeqId
from lorasrv.messages import HostCopyReady, RunnerReady, StepPlan, StepResult
from lorasrv.model import startup
from lorasrv.model.arch import ModelArch, read_arch
from lorasrv.model.attention import KvCache, make_attention, needs_dense_metadata
from lorasrv.model.batch import StepPreparer
from lorasrv.model.cuda_graphs import DecodeRunner
from lorasrv.model.device_tokens import DeviceTokens
from lorasrv.model.hot_cache import make_hot_cache
from lorasrv.model.llama import LlamaModel
from lorasrv.model.loader import load_model_weights
from lorasrv.model.lora_backend import make_lora_backend
from lorasrv.model.lora_layout import HostAdapter, row_layout
from lorasrv.model.lora_runtime import LoraRuntime
from lorasrv.model.parallel import TpGroup, TpLlamaModel
from lorasrv.model.pending_sample import PendingSample
from lorasrv.model.sampler import Sampler
from lorasrv.model.sharding import load_sharded_weights, shard_arch

logger = logging.getLogger(__name__)

_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


class ModelRunner:
    """Loads the base model, sizes the arena (KV pages + LoRA rows), and runs StepPlans: upload,
    plan, forward, sample."""

    def __init__(
        self,
        *,
        model_path: str,
        dtype: str = "auto",
        device: str = "auto",
        revision: str | None = None,
        context_length: int | None = None,
        page_size: int = 16,
        kv_cache_bytes: int | None = None,
        num_kv_pages: int | None = None,
        mem_fraction_static: float = 0.85,
        enable_lora: bool = False,
        lora_max_rank: int = 0,
        lora_target_modules: tuple[str, ...] = (),
        lora_backend: str = "auto",
        lora_hot_rows: int | None = None,
        seed: int = 0,
        enable_cuda_graph: bool = False,
        allow_pickle: bool = False,
        tp: TpGroup | None = None,
        attention_backend: str = "auto",
        cuda_graph_max_batch_size: int = 256,
    ) -> None:
        started = time.monotonic()
        torch.manual_seed(seed)
        self.device = startup.resolve_device(device)
        patterns = [*_MODEL_FILES, "*.bin"] if allow_pickle else _MODEL_FILES
        self.model_path = resolve_path(model_path, revision=revision, allow_patterns=patterns)
        self.arch: ModelArch = read_arch(self.model_path)
        # Tensor parallel (one process per rank): this rank's heads, KV heads and MLP width.
        self.tp = tp
        self.shard_arch = shard_arch(self.arch, tp.shard) if tp is not None else self.arch
        self.dtype = startup.resolve_dtype(dtype, self.arch, self.device)
        self.allow_pickle = allow_pickle
        self.page_size = page_size
        self.context_length = startup.context_length(self.arch, context_length)
        self.attention_backend = attention_backend
        self.model = self._load_model()
        self.lora_target_modules = startup.lora_target_modules(lora_target_modules)
        self.lora_max_rank = lora_max_rank
        self.lora_backend = make_lora_backend(lora_backend, self.device, lora_max_rank)
        layout = row_layout(self.shard_arch, self.lora_target_modules) if enable_lora else None
        # Before the arena: the hot A cache's memory comes out of the arena's budget.
        hot = None
        if layout is not None:
            hot = make_hot_cache(self.model, layout, self.lora_backend, lora_hot_rows)
        self.arena = startup.make_arena(
            self.shard_arch,
            page_size=page_size,
            row_elems=layout.row_elems if layout is not None else 0,
            dtype=self.dtype,
            device=self.device,
            kv_cache_bytes=kv_cache_bytes,
            num_kv_pages=num_kv_pages,
            mem_fraction_static=mem_fraction_static,
            min_pages=tp.min_int if tp is not None else None,
        )
        self.num_kv_pages = self.arena.num_pages
        self.kv_cache = KvCache(self.arena)
        self.lora: LoraRuntime | None = None
        if layout is not None:
            self.lora = LoraRuntime(
                self.arena,
                layout,
                self.model,
                self.lora_backend,
                max_rank=lora_max_rank,
                device=self.device,
                hot=hot,
            )
        self.preparer = StepPreparer(
            page_size=page_size,
            num_pages=self.num_kv_pages,
            device=self.device,
            dense_metadata=needs_dense_metadata(self.model.attention),
        )
        self.decode = self._make_decode_runner(enable_cuda_graph, cuda_graph_max_batch_size)
        self.sampler = Sampler(self.arch.vocab_size, self.device, seed=seed)
        # Under TP the coordinator fills device inputs on the host (only rank 0 may have the
        # tokens), so workers keep no table.
        self.tokens = DeviceTokens(self.device) if tp is None else None
        logger.info(
            "model %s (%s) on %s in %s: arena of %.2f GiB, %d KV pages of %d tokens, "
            "%d LoRA rows, %.1fs",
            self.model_path,
            self.arch.architecture,
            self.device,
            self.dtype,
            self.arena.num_bytes / (1 << 30),
            self.num_kv_pages,
            page_size,
            self.lora.pool.max_rows if self.lora is not None else 0,
            time.monotonic() - started,
        )

    # ------------------------------------------------------------------ StepRunner protocol

    def ready(self) -> RunnerReady:
        geometry = self.arena.geometry
        return RunnerReady(
            num_kv_pages=self.num_kv_pages,
            page_size=self.page_size,
            kv_page_bytes=geometry.page_bytes,
            lora_row_bytes=geometry.row_bytes if self.lora is not None else 0,
            lora_max_rows=geometry.max_rows if self.lora is not None else 0,
            max_lora_rank=self.lora_max_rank,
            lora_target_modules=self.lora_target_modules,
            vocab_size=self.arch.vocab_size,
            context_length=self.context_length,
            eos_token_ids=self.arch.eos_token_ids,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def launch(self, plan: StepPlan) -> PendingStep:
        """Queue the step (uploads, compute, sampling, the tokens' copies to the host) and
        return without waiting: the next step may be launched behind it at once, its device
        inputs reading the tokens this one samples."""
        for seq_id in plan.freed_seq_ids:
            self.sampler.remove_seq(seq_id)
            if self.tokens is not None:
                self.tokens.remove(seq_id)
        for seq in plan.new_seqs:
            self.sampler.add_seq(seq)
            if self.tokens is not None:
                self.tokens.add(seq.seq_id)
        self._upload(plan)
        if not plan.seq_ids:
            return DoneStep(StepResult())
        logits, seq_ids = self._forward(plan)
        sampled = self._sample(logits, seq_ids) if seq_ids else None
        if sampled is None:
            return DoneStep(StepResult())  # nothing sampled, or a TP rank other than 0
        if self.tokens is not None:
            self.tokens.record(seq_ids, sampled.token_ids)
        return sampled

    def step(self, plan: StepPlan) -> StepResult:
        """`launch`, then wait for the tokens (tests, benches, TP workers)."""
        return self.launch(plan).result()

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Logits `[num_sampled, vocab]` float32 of a plan (its uploads first), writing its K/V;
        for tests and benches (a `step` of the same plan after it redoes the same writes)."""
        self._upload(plan)
        logits = self._forward(plan)[0]
        if isinstance(self.model, TpLlamaModel):
            return self.model.gather_logits(logits)
        return logits

    def add_host_copy(self, copy: HostCopyReady) -> None:
        """Keep an adapter's host copy (and its rank, scaling) for the uploads plans ask for."""
        if self.lora is None:
            raise ValueError("add_host_copy: this runner has LoRA off (enable_lora=False)")
        self.lora.add_host_copy(copy)

    def drop_host_copy(self, adapter_id: AdapterId) -> None:
        if self.lora is not None:
            self.lora.drop_host_copy(adapter_id)

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """A single-process runner fails only inside a call, which raises: nothing to report."""

    def shutdown(self) -> None:
        self.lora = None
        self.decode = None  # its graphs hold their memory pool
        del self.kv_cache, self.arena, self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def make_adapter_loader(self) -> Callable[[str], HostAdapter]:
        """A CPU-only, thread-safe loader: adapter folder (already resolved) -> its host copy,
        packed into this runner's row layout (pinned on CUDA)."""
        if self.lora is None:
            raise RuntimeError("make_adapter_loader: this runner has LoRA off (enable_lora=False)")
        return self.lora.make_loader(
            self.arch, self.lora_target_modules, self.dtype, allow_pickle=self.allow_pickle
        )

    # ------------------------------------------------------------------ internals

    def _sample(self, logits: torch.Tensor, seq_ids: list[SeqId]) -> PendingSample | None:
        """The step's tokens; None on TP ranks other than 0 (TpLlamaModel.sample)."""
        if isinstance(self.model, TpLlamaModel):
            return self.model.sample(self.sampler, logits, seq_ids)
        return self.sampler.sample_async(logits, seq_ids)

    @torch.inference_mode()
    def _forward(self, plan: StepPlan) -> tuple[torch.Tensor, list[SeqId]]:
        page_limit = None
        if self.lora is not None:
            page_limit = self.lora.before_compute(plan)
        elif plan.adapters or any(a >= 0 for a in plan.lora_adapters):
            raise ValueError("plan has adapter rows but this runner has LoRA off")
        tokens = self.tokens
        if tokens is None and any(plan.device_inputs):
            raise ValueError("plan has device inputs, which a TP worker cannot read")
        if self.decode is not None and self.decode.can_run(plan):
            fill = (lambda ids: tokens.fill(ids, plan)) if tokens is not None else None
            logits = self.decode.run(plan, fill_inputs=fill, page_limit=page_limit)
            return logits, list(plan.seq_ids)
        batch = self.preparer.prepare(plan, page_limit)
        if tokens is not None:
            tokens.fill(batch.input_ids, plan)
        logits = self.model.forward(
            batch.input_ids,
            batch.metadata,
            self.kv_cache,
            self.lora.step(plan) if self.lora is not None else None,
            batch.sample_index,
        )
        return logits, batch.sampled_seq_ids

    def _upload(self, plan: StepPlan) -> None:
        if self.lora is not None:
            self.lora.uploader.upload(plan.uploads)
        elif plan.uploads:
            raise ValueError("plan uploads adapters but this runner has LoRA off")

    def _load_model(self) -> LlamaModel:
        load: Callable[..., dict[str, torch.Tensor]] = load_model_weights
        if self.tp is not None:  # only this rank's part of each tensor reaches the device
            load = functools.partial(load_sharded_weights, shard=self.tp.shard)
        weights = load(
            self.model_path,
            self.arch,
            dtype=self.dtype,
            device=self.device,
            allow_pickle=self.allow_pickle,
        )
        attention = make_attention(
            self.attention_backend, scale=self.arch.head_dim**-0.5, device=self.device
        )
        if self.tp is not None:
            return TpLlamaModel(
                self.arch, weights, attention=attention, device=self.device, tp=self.tp
            )
        return LlamaModel(self.arch, weights, attention=attention, device=self.device)

    def _make_decode_runner(self, use_graphs: bool, max_batch_size: int) -> DecodeRunner | None:
        """Static-buffer decode (graphs on CUDA when enabled) when attention and LoRA can run it:
        kernel attention, a LoRA backend that supports graphs.

        Under TP every rank builds the same buckets and captures them in the same order (same
        flags, same code), so the collectives inside each graph line up across ranks; the
        logits' gather or vocab-parallel argmax runs after the replay (`_sample`)."""
        reason = None
        if needs_dense_metadata(self.model.attention):
            reason = "the reference attention backend"
        elif self.lora is not None and not self.lora_backend.supports_cuda_graphs:
            reason = f"the {self.lora_backend.name} LoRA backend"
        if reason is not None:
            if use_graphs and self.device.type == "cuda":
                logger.info("CUDA graphs off: not available with %s", reason)
            return None
        decode = DecodeRunner(
            model=self.model,
            kv_cache=self.kv_cache,
            lora=self.lora.decode_lora(max_batch_size) if self.lora is not None else None,
            max_batch_size=max_batch_size,
            max_pages_per_seq=min(-(-self.context_length // self.page_size), self.num_kv_pages),
            device=self.device,
        )
        if use_graphs and self.device.type == "cuda":
            decode.capture()
        return decode
