"""Tensor-parallel model pieces: a rank's process-group handle, row-parallel LoRA-aware linears
and the vocab-parallel Llama model. Built only when tp_size > 1; the plain model never calls them.

Runs inside one worker process per rank; the collectives are torch.distributed (NCCL or gloo).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lorasrv.ids import SeqId
from lorasrv.model.arch import ModelArch
from lorasrv.model.attention import AttentionBackend
from lorasrv.model.layers import LoraLinear
from lorasrv.model.llama import LlamaModel
from lorasrv.model.lora_backend import LoraStep
from lorasrv.model.pending_sample import PendingSample
from lorasrv.model.sampler import Sampler
from lorasrv.model.sharding import Shard, shard_arch, vocab_range

# torch >= 2.13 renames all_gather_into_tensor; same arguments.
_all_gather_single: Any = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True, slots=True)
class TpGroup:
    """This process's rank in the tensor-parallel group and the group's collectives."""

    rank: int
    size: int
    device: torch.device  # where collective buffers live (CUDA for NCCL, CPU for gloo)
    group: Any = None  # torch.distributed ProcessGroup; None = the default group

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_cols(self, x: torch.Tensor) -> torch.Tensor:
        """`[n, k]` on every rank -> `[n, size * k]`, rank r's columns at `r*k:(r+1)*k`."""
        n, k = x.shape
        if n == 0:
            return x.new_empty(0, self.size * k)
        out = x.new_empty(self.size * n, k)
        _all_gather_single(out, x.contiguous(), group=self.group)
        return out.view(self.size, n, k).transpose(0, 1).reshape(n, self.size * k)

    def all_gather_stack(self, x: torch.Tensor) -> torch.Tensor:
        """`x` on every rank -> `[size, *x.shape]`, rank r's at index r."""
        out = x.new_empty(self.size * x.shape[0], *x.shape[1:])  # concatenated along dim 0
        _all_gather_single(out, x.contiguous(), group=self.group)
        return out.view(self.size, *x.shape)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (e.g. KV pages that fit on every device)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


class RowParallelLoraLinear(LoraLinear):
    """o/down: this rank's input columns; partial outputs are summed by one all-reduce.

    LoRA (S-LoRA shards: A split by input columns like the weight, B whole): each rank adds
    `scaling·(x_r·A_rᵀ)·Bᵀ` from its own partial `x_r·A_rᵀ` to its partial output, through the
    backend's ordinary `linear`. The delta is linear in that partial, so the layer's one
    all-reduce sums the LoRA deltas with the base: `Σ_r (x_r·A_rᵀ)·Bᵀ = (x·Aᵀ)·Bᵀ`. LoRA adds no
    collective at all (no all-reduce of the rank-r intermediate); every rank runs the expand,
    in parallel. The bias lives on rank 0 only (sharding.py), so it is added once.
    """

    __slots__ = ("tp",)

    def __init__(self, linear: LoraLinear, tp: TpGroup) -> None:
        super().__init__(linear.weight, linear.bias, (linear.weight.shape[0],))
        self.tp = tp

    def forward(self, x: torch.Tensor, lora: LoraStep | None) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x, lora))  # [num_tokens, out], summed


class TpLlamaModel(LlamaModel):
    """The decoder over this rank's heads and MLP columns, with a vocab-parallel embedding and
    LM head. Column-parallel q/k/v and gate/up need no communication: their inputs are whole.

    `forward` returns this rank's logits only, `[num_sampled, padded vocab / size]` (the
    inherited `head`, over this rank's vocab rows): the caller either takes the vocab-parallel
    argmax (`greedy_tokens`, a few bytes per row between ranks) or gathers them all
    (`gather_logits`). Decode graphs capture `forward`; both of these run after the replay."""

    def __init__(
        self,
        arch: ModelArch,
        weights: Mapping[str, torch.Tensor],
        *,
        attention: AttentionBackend,
        device: torch.device,
        tp: TpGroup,
    ) -> None:
        super().__init__(shard_arch(arch, tp.shard), weights, attention=attention, device=device)
        self.tp = tp
        self.vocab_size = arch.vocab_size
        self.vocab_lo, self.vocab_hi = vocab_range(arch.vocab_size, tp.shard)
        for layer in self.layers:
            layer.o_proj = RowParallelLoraLinear(layer.o_proj, tp)
            layer.down_proj = RowParallelLoraLinear(layer.down_proj, tp)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each rank looks up the ids in its vocab range, zeros elsewhere; the sum is exact."""
        outside = (input_ids < self.vocab_lo) | (input_ids >= self.vocab_hi)  # [num_tokens]
        local = (input_ids - self.vocab_lo).masked_fill(outside, 0)
        hidden = F.embedding(local, self.embed_tokens)  # [num_tokens, hidden]
        hidden.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(hidden)

    def sample(
        self, sampler: Sampler, local: torch.Tensor, seq_ids: Sequence[SeqId]
    ) -> PendingSample | None:
        """The step's tokens from this rank's logits; None on ranks other than 0 (rank 0 reports
        for all). A plain-greedy step takes the vocab-parallel argmax, so no rank gathers a full
        row and every rank ends the step with the tokens on its device (what an overlap schedule
        feeds the next step); any other step gathers the logits, and rank 0 samples exactly as
        without TP (same sampler, seeds and code)."""
        is_rank0 = self.tp.rank == 0
        if sampler.is_plain_greedy(seq_ids):
            tokens = self.greedy_tokens(local)  # [num_sampled] int64
            return PendingSample(tokens, [], [], [], len(seq_ids)) if is_rank0 else None
        full = self.gather_logits(local)  # [num_sampled, vocab]
        return sampler.sample_async(full, seq_ids) if is_rank0 else None

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's vocab columns, `[num_sampled, vocab]` float32 (padding dropped)."""
        return self.tp.all_gather_cols(local)[:, : self.vocab_size]

    def greedy_tokens(self, local: torch.Tensor) -> torch.Tensor:
        """The argmax over the whole vocabulary, `[num_sampled]` int64 on every rank: each rank's
        first maximum, one all-gather of `[num_sampled, 2]` float64, the best rank's token."""
        pairs = local_argmax(local, self.vocab_lo, self.vocab_hi)
        return best_of_ranks(self.tp.all_gather_stack(pairs))


def local_argmax(local: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """`[n, 2]` float64 (value, token id) of each row's first maximum over this rank's vocab
    columns `local` `[n, padded shard]` (ids `lo..hi-1`; columns past them are padding)."""
    local = local[:, : hi - lo]
    if local.shape[1] == 0:  # a rank past the vocabulary (tiny vocab, many ranks)
        values = local.new_full((local.shape[0],), float("-inf"))
        index = torch.zeros(local.shape[0], dtype=torch.int64, device=local.device)
    else:
        values, index = local.max(dim=-1)  # [n]: the first maximum in this shard
    return torch.stack([values.double(), (index + lo).double()], dim=1)


def best_of_ranks(every: torch.Tensor) -> torch.Tensor:
    """`[size, n, 2]` every rank's `local_argmax` -> `[n]` int64: the token of the first rank
    holding the largest value. The same token as the argmax of the gathered logits: values are
    the same floats, and a tie goes to the lowest token id both ways (a shard's first maximum,
    then the lowest rank; ranks hold ascending vocab ranges). Ids are exact in float64."""
    best = every[:, :, 0].argmax(dim=0, keepdim=True)  # [1, n]
    return every[:, :, 1].gather(0, best).squeeze(0).long()
