"""Tensor-parallel sharding rules: the rows/columns of each weight and adapter matrix a rank keeps.

Megatron for the base (q/k/v, gate/up by output rows; o, down by input columns; vocab by rows),
S-LoRA for adapters. Pure tensor slicing on the host; no process groups, no devices.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from lorasrv.model.arch import ModelArch
from lorasrv.model.loader import TensorFiles, checked_weight_plan, checkpoint_files
from lorasrv.model.lora_layout import AdapterWeights, LoraModuleWeights

#: pool modules whose output is split over ranks (input replicated)
COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj")
#: pool modules whose input is split over ranks (partial outputs summed by an all-reduce)
ROW_PARALLEL = ("o_proj", "down_proj")


class Shard(NamedTuple):
    rank: int
    size: int


def split_problems(arch: ModelArch, tp_size: int) -> list[str]:
    """Why the model cannot be split over `tp_size` ranks; empty when it can."""
    problems = []
    if arch.num_heads % tp_size:
        problems.append(f"its {arch.num_heads} attention heads are not divisible by {tp_size}")
    kv = arch.num_kv_heads
    if kv % tp_size and tp_size % kv:
        # More ranks than KV heads works by replication, but only in whole copies.
        problems.append(
            f"its {kv} KV heads are not divisible by {tp_size}, nor is {tp_size} a multiple "
            "of them (KV heads are replicated only in whole copies)"
        )
    if arch.intermediate_size % tp_size:
        problems.append(f"its MLP width {arch.intermediate_size} is not divisible by {tp_size}")
    return problems


def check_split(arch: ModelArch, tp_size: int) -> None:
    """ValueError naming --tp-size when Megatron sharding cannot split this model evenly."""
    problems = split_problems(arch, tp_size)
    if problems:
        raise ValueError(
            f"--tp-size {tp_size} cannot shard this {arch.architecture}: {'; '.join(problems)}"
        )


def kv_heads(arch: ModelArch, shard: Shard) -> tuple[int, int]:
    """(first KV head, count) of a rank; with more ranks than KV heads each holds one copy."""
    if arch.num_kv_heads >= shard.size:
        count = arch.num_kv_heads // shard.size
        return shard.rank * count, count
    # NOTE: rank r's query heads [r*h, (r+1)*h) all read KV head r // (size / kv): GQA groups
    # line up with ranks because size is a multiple of the KV head count (check_split).
    return shard.rank // (shard.size // arch.num_kv_heads), 1


def shard_arch(arch: ModelArch, shard: Shard) -> ModelArch:
    """The slice of the model one rank runs: its heads, KV heads and MLP width; vocab stays."""
    return dataclasses.replace(
        arch,
        num_heads=arch.num_heads // shard.size,
        num_kv_heads=kv_heads(arch, shard)[1],
        intermediate_size=arch.intermediate_size // shard.size,
    )


def vocab_range(vocab_size: int, shard: Shard) -> tuple[int, int]:
    """[lo, hi) token ids whose embedding/head rows a rank holds (shards padded to one size)."""
    per = -(-vocab_size // shard.size)
    lo = min(shard.rank * per, vocab_size)
    return lo, min(lo + per, vocab_size)


def out_rows(arch: ModelArch, shard: Shard, module: str) -> list[tuple[int, int]] | None:
    """Row ranges of a fused output (q|k|v or gate|up) a rank keeps; None = all rows."""
    head_dim = arch.head_dim
    if module == "qkv_proj":
        q_per = arch.q_size // shard.size
        first_kv, num_kv = kv_heads(arch, shard)
        k_lo = arch.q_size + first_kv * head_dim
        v_lo = k_lo + arch.kv_size
        size = num_kv * head_dim
        q_lo = shard.rank * q_per
        return [(q_lo, q_lo + q_per), (k_lo, k_lo + size), (v_lo, v_lo + size)]
    if module == "gate_up_proj":
        per = arch.intermediate_size // shard.size
        lo = shard.rank * per
        return [(lo, lo + per), (arch.intermediate_size + lo, arch.intermediate_size + lo + per)]
    return None


def in_cols(arch: ModelArch, shard: Shard, module: str) -> tuple[int, int] | None:
    """Input column range a rank keeps for row-parallel modules; None = all columns."""
    width = {"o_proj": arch.q_size, "down_proj": arch.intermediate_size}.get(module)
    if width is None:
        return None
    per = width // shard.size
    return shard.rank * per, (shard.rank + 1) * per


def take_rows(t: torch.Tensor, ranges: list[tuple[int, int]] | None) -> torch.Tensor:
    if ranges is None:
        return t
    if len(ranges) == 1:
        return t[ranges[0][0] : ranges[0][1]]
    return torch.cat([t[lo:hi] for lo, hi in ranges])


def take_cols(t: torch.Tensor, cols: tuple[int, int] | None) -> torch.Tensor:
    return t if cols is None else t[:, cols[0] : cols[1]]


def shard_weight(name: str, t: torch.Tensor, arch: ModelArch, shard: Shard) -> torch.Tensor | None:
    """A rank's part of one base weight (our fused names); None = this rank has none."""
    if name in ("embed_tokens.weight", "lm_head.weight"):
        lo, hi = vocab_range(arch.vocab_size, shard)
        part = t[lo:hi]
        per = -(-arch.vocab_size // shard.size)
        if part.shape[0] < per:  # the last shard is padded with zero rows (never selected)
            part = torch.cat([part, part.new_zeros(per - part.shape[0], *part.shape[1:])])
        return part
    module = name.split(".")[-2] if name.startswith("layers.") else ""
    if name.endswith("o_proj.bias"):
        # Row-parallel: the bias joins once, on rank 0, before the all-reduce.
        return t if shard.rank == 0 else None
    if module in COLUMN_PARALLEL:
        return take_rows(t, out_rows(arch, shard, module))
    if module in ROW_PARALLEL:
        return take_cols(t, in_cols(arch, shard, module))
    return t  # norms: replicated


def shard_adapter(weights: AdapterWeights, arch: ModelArch, shard: Shard) -> AdapterWeights:
    """S-LoRA: column-parallel modules keep A whole and split B by output rows; row-parallel
    modules split A by input columns and keep B whole (only rank 0 expands, see parallel.py)."""
    modules = {
        key: LoraModuleWeights(
            a=take_cols(w.a, in_cols(arch, shard, key[1])),
            b=take_rows(w.b, out_rows(arch, shard, key[1])),
        )
        for key, w in weights.modules.items()
    }
    return dataclasses.replace(weights, modules=modules)


def load_sharded_weights(
    model_dir: str,
    arch: ModelArch,
    *,
    shard: Shard,
    dtype: torch.dtype,
    device: torch.device,
    allow_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """Like loader.load_model_weights, but each tensor is cut to this rank's part on the host
    before it moves to the device, so a rank never holds the whole model."""
    files = TensorFiles(
        checkpoint_files(model_dir, allow_pickle=allow_pickle), allow_pickle=allow_pickle
    )
    try:
        plan = checked_weight_plan(files, arch, model_dir)
        weights: dict[str, torch.Tensor] = {}
        for name, (sources, shape) in plan.items():
            parts = [files.get(n) for n in sources]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{model_dir}: {name} has shape {tuple(tensor.shape)}, config implies {shape}"
                )
            part = shard_weight(name, tensor, arch, shard)
            if part is not None:
                # copy=True: on CPU a same-dtype `.to` would keep a view of the whole tensor.
                weights[name] = part.to(
                    device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True
                )
        return weights
    finally:
        files.close()
