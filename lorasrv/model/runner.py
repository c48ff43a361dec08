"""ModelRunner: the StepRunner that runs the real model; owns the weights, KV cache and LoRA pool.

Runs on the GPU runner's one thread; every method may block. Never imports asyncio or the engine.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from lorasrv_kernels import triton_lora_forward

from lorasrv.hub import resolve_path
from lorasrv.ids import AdapterId, SeqId, SlotId
from lorasrv.messages import RunnerReady, StepPlan, TokenLogprob
from lorasrv.model import startup
from lorasrv.model.adapter_loader import load_adapter
from lorasrv.model.arch import ModelArch, read_arch
from lorasrv.model.attention import KvCache, make_attention, needs_dense_metadata
from lorasrv.model.batch import StepPreparer
from lorasrv.model.cuda_graphs import DecodeRunner
from lorasrv.model.layers import make_lora_step
from lorasrv.model.llama import LlamaModel
from lorasrv.model.loader import load_model_weights
from lorasrv.model.lookahead import Guess, guess_holds, next_decode_plan
from lorasrv.model.lora_layout import AdapterWeights
from lorasrv.model.lora_pool import LoraPool
from lorasrv.model.parallel import TpGroup, TpLlamaModel
from lorasrv.model.pending_sample import PendingSample
from lorasrv.model.sampler import Sampler, upload
from lorasrv.model.sharding import load_sharded_weights, shard_arch

logger = logging.getLogger(__name__)

_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


class StepResult(NamedTuple):
    """One entry per sampled row of the plan, in row order (matches engine's StepOutput)."""

    token_ids: list[int]
    logprobs: list[float]  # empty unless some row asked for logprobs
    top_logprobs: list[tuple[TokenLogprob, ...]]  # empty unless some row asked


class ModelRunner:
    """Loads the base model, sizes the KV cache, and runs StepPlans: plan, forward, sample."""

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
        lora_num_slots: int = 0,
        lora_max_rank: int = 0,
        lora_target_modules: tuple[str, ...] = (),
        lora_backend: str = "auto",
        seed: int = 0,
        enable_cuda_graph: bool = False,
        allow_pickle: bool = False,
        tp: TpGroup | None = None,
        attention_backend: str = "auto",
        cuda_graph_max_batch_size: int = 256,
        enable_lookahead: bool = True,
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
        self.lora_op = startup.lora_op(lora_backend, self.device)
        self.pool = self._make_pool(lora_num_slots) if lora_num_slots > 0 else None
        self.num_kv_pages = num_kv_pages or startup.count_kv_pages(
            self.shard_arch,
            page_size=page_size,
            dtype=self.dtype,
            device=self.device,
            kv_cache_bytes=kv_cache_bytes,
            mem_fraction_static=mem_fraction_static,
        )
        if tp is not None:  # NOTE: the scheduler's page ids must be valid on every rank
            self.num_kv_pages = tp.min_int(self.num_kv_pages)
        self.kv_cache = KvCache(
            num_layers=self.arch.num_layers,
            num_pages=self.num_kv_pages,
            page_size=page_size,
            num_kv_heads=self.shard_arch.num_kv_heads,
            head_dim=self.arch.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.preparer = StepPreparer(
            page_size=page_size,
            num_pages=self.num_kv_pages,
            device=self.device,
            dense_metadata=needs_dense_metadata(self.model.attention),
        )
        self.decode = self._make_decode_runner(enable_cuda_graph, cuda_graph_max_batch_size)
        self.sampler = Sampler(self.arch.vocab_size, self.device, seed=seed)
        # The next decode step runs while the host plans it (lookahead.py); static decode only.
        self.lookahead = enable_lookahead and self.decode is not None
        self._guess: Guess | None = None
        self.num_guesses_used = 0
        self.num_guesses_dropped = 0
        logger.info(
            "model %s (%s) on %s in %s: %d KV pages of %d tokens, %d LoRA slots, %.1fs",
            self.model_path,
            self.arch.architecture,
            self.device,
            self.dtype,
            self.num_kv_pages,
            page_size,
            lora_num_slots,
            time.monotonic() - started,
        )

    # ------------------------------------------------------------------ StepRunner protocol

    def ready(self) -> RunnerReady:
        return RunnerReady(
            num_kv_pages=self.num_kv_pages,
            page_size=self.page_size,
            num_lora_slots=self.pool.num_slots if self.pool is not None else 0,
            max_lora_rank=self.lora_max_rank,
            lora_target_modules=self.lora_target_modules,
            vocab_size=self.arch.vocab_size,
            context_length=self.context_length,
            eos_token_ids=self.arch.eos_token_ids,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def step(self, plan: StepPlan) -> StepResult:
        for seq_id in plan.freed_seq_ids:
            self.sampler.remove_seq(seq_id)
        for seq in plan.new_seqs:
            self.sampler.add_seq(seq)
        guess = self._take_guess()
        if not plan.seq_ids:
            self.num_guesses_dropped += guess is not None
            return StepResult([], [], [])
        if guess is not None and guess_holds(guess, plan, self.page_size):
            self.num_guesses_used += 1
            pending = guess.pending
        else:
            self.num_guesses_dropped += guess is not None
            logits, seq_ids = self._forward(plan)
            if not seq_ids or (self.tp is not None and self.tp.rank != 0):
                return StepResult([], [], [])  # with TP, rank 0 alone samples (logits gathered)
            pending = self.sampler.sample_async(logits, seq_ids)
        self._launch_guess(plan, pending)  # queued behind this step, before waiting for it
        result = pending.result()
        return StepResult(result.token_ids, result.logprobs, result.top_logprobs)

    def forward(self, plan: StepPlan) -> torch.Tensor:
        """Logits `[num_sampled, vocab]` float32 of a plan, writing its K/V; for tests/benches."""
        return self._forward(plan)[0]

    def load_slot(self, slot_id: SlotId, adapter_id: AdapterId, weights: object) -> None:
        if self.pool is None:
            raise RuntimeError("load_slot: this runner has no LoRA slots (lora_num_slots=0)")
        if not isinstance(weights, AdapterWeights):
            raise TypeError(f"load_slot: expected AdapterWeights, got {type(weights).__name__}")
        self.num_guesses_dropped += self._take_guess() is not None  # ran on the old slots
        self.pool.load_slot(slot_id, adapter_id, weights)

    def clear_slot(self, slot_id: SlotId) -> None:
        if self.pool is not None:
            self.num_guesses_dropped += self._take_guess() is not None
            self.pool.clear_slot(slot_id)

    def shutdown(self) -> None:
        self._guess = None
        self.pool = None
        self.decode = None  # its graphs hold their memory pool
        del self.kv_cache, self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def make_adapter_loader(self) -> Callable[[str], AdapterWeights]:
        """A CPU-only, thread-safe loader of adapter folders (already resolved) for this base."""
        arch, rank, targets = self.arch, self.lora_max_rank, self.lora_target_modules
        dtype, allow_pickle = self.dtype, self.allow_pickle

        def load(path: str) -> AdapterWeights:
            return load_adapter(
                path,
                arch=arch,
                max_rank=rank,
                target_modules=targets,
                allow_pickle=allow_pickle,
                dtype=dtype,
            )

        return load

    # ------------------------------------------------------------------ internals

    def _take_guess(self) -> Guess | None:
        guess, self._guess = self._guess, None
        return guess

    @torch.inference_mode()
    def _launch_guess(self, plan: StepPlan, parent: PendingSample) -> None:
        """Queue the step after `plan`, fed `parent`'s tokens on the device, if it can be
        guessed (see lookahead.py); its results wait in `self._guess`."""
        if not self.lookahead or self.decode is None or not plan.expect_next_decode:
            return
        planned = next_decode_plan(plan, self.page_size, self.context_length)
        if planned is None:
            return
        guess, keep = planned
        if not self.decode.can_run(guess) or not self.sampler.is_replayable(guess.seq_ids):
            return
        input_ids = parent.token_ids
        if len(keep) < len(plan.seq_ids):  # rows that stop by length are left out
            rows = upload(torch.tensor(keep, dtype=torch.int64), self.device)
            input_ids = input_ids.index_select(0, rows)
        logits = self.decode.run(guess, input_ids=input_ids)
        pending = self.sampler.sample_async(logits, guess.seq_ids)
        self._guess = Guess(guess, keep, parent, pending)

    @torch.inference_mode()
    def _forward(self, plan: StepPlan) -> tuple[torch.Tensor, list[SeqId]]:
        if self.decode is not None and self.decode.can_run(plan):
            return self.decode.run(plan), list(plan.seq_ids)
        batch = self.preparer.prepare(plan)
        lora = None
        if self.pool is not None and batch.seg_indptr is not None and batch.seg_slot is not None:
            info = self.pool.batch_info(batch.seg_indptr, batch.seg_slot, batch.max_seg_len)
            lora = make_lora_step(info, self.lora_op, int(batch.input_ids.shape[0]))
        elif batch.seg_indptr is not None:
            raise ValueError("plan has adapter rows but this runner has no LoRA slots")
        logits = self.model.forward(
            batch.input_ids, batch.metadata, self.kv_cache, lora, batch.sample_index
        )
        return logits, batch.sampled_seq_ids

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
        kernel attention, Triton LoRA, no TP."""
        reason = None
        if needs_dense_metadata(self.model.attention):
            reason = "the reference attention backend"
        elif self.tp is not None:
            reason = "tensor parallelism"
        elif self.pool is not None and self.lora_op is not triton_lora_forward:
            reason = "the torch LoRA backend (it reads segments back to the host)"
        if reason is not None:
            if use_graphs and self.device.type == "cuda":
                logger.info("CUDA graphs off: not available with %s", reason)
            return None
        decode = DecodeRunner(
            model=self.model,
            kv_cache=self.kv_cache,
            pool=self.pool,
            lora_op=self.lora_op,
            max_batch_size=max_batch_size,
            max_pages_per_seq=min(-(-self.context_length // self.page_size), self.num_kv_pages),
            device=self.device,
        )
        if use_graphs and self.device.type == "cuda":
            decode.capture()
        return decode

    def _make_pool(self, num_slots: int) -> LoraPool:
        pool = LoraPool(
            self.shard_arch,
            num_slots=num_slots,
            max_rank=self.lora_max_rank,
            target_modules=self.lora_target_modules,
            dtype=self.dtype,
            device=self.device,
        )
        pool.attach(self.model)
        return pool
