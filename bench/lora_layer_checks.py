"""Checks bench/lora_layer.py runs before timing: the arena-row kernels in bf16 against the torch
reference at Llama-3-8B shapes (poisoned outputs, NaN in unused arena rows, base rows untouched,
split-K counters re-armed), under graph replay with new step contents (bitwise repeatable), and
the float32 intermediate's error against float64 beside the slot path's bf16 one."""

from __future__ import annotations

import math
import random

import torch
from lora_layer_setup import MODULES, TINY_MODULES, offsets
from lorasrv_kernels import (
    LoraBatchBuffers,
    lora_apply,
    lora_reference,
    lora_shrink,
    lora_silu_mul,
    prepare_lora_batch_info,
    triton_lora_forward,
)
from lorasrv_kernels.slot_batch_info import prepare_slot_batch_info

RANKS = (8, 16, 20, 32, 64, 0)  # 20: a partial rank tile; 0: base rows
MAX_RANK = 64


def _step(seed: int, num_tokens: int, num_adapters: int) -> tuple[list[int], list[int]]:
    """Zipf-ish segment lengths (empty and one-token ones included) and each one's rank."""
    rng = random.Random(seed)
    picks = rng.choices(range(num_adapters), weights=[1 / (a + 1) for a in range(num_adapters)],
                        k=num_tokens)  # fmt: skip
    lens = [picks.count(a) for a in range(num_adapters)]
    return lens, [RANKS[(a + seed) % len(RANKS)] for a in range(num_adapters)]


class _Arena:
    """One module's A and B parts in a NaN-poisoned arena; rows shuffled."""

    def __init__(self, in_features: int, widths: tuple[int, ...], ranks: list[int],
                 dtype: torch.dtype, device: str, seed: int) -> None:  # fmt: skip
        gen = torch.Generator().manual_seed(seed)
        self.a_width, self.out_total = len(widths) * in_features, sum(widths)
        total = sum(ranks)
        perm = torch.randperm(2 * total + 8, generator=gen).tolist()
        self.seg_rows, used = [], 0
        for rank in ranks:
            self.seg_rows.append(perm[used : used + rank])
            used += rank
        arena = torch.full((2 * total + 8, self.a_width + self.out_total + 16), math.nan)
        taken = perm[:total]
        arena[taken, : self.a_width] = torch.randn(total, self.a_width, generator=gen) * 0.02
        arena[taken, self.a_width + 8 : self.a_width + 8 + self.out_total] = (
            torch.randn(total, self.out_total, generator=gen) * 0.05
        )
        arena = arena.to(dtype=dtype, device=device)
        self.a_rows = arena[:, : self.a_width]
        self.bt_rows = arena[:, self.a_width + 8 : self.a_width + 8 + self.out_total]


def _close(failures: list[str], label: str, got: torch.Tensor, want: torch.Tensor,
           tol: float) -> None:  # fmt: skip
    got, want = got.float(), want.float()
    if not bool(torch.isfinite(got).all()):
        failures.append(f"{label}: non-finite output")
        return
    err = ((got - want).abs() / (want.abs() + 1.0)).max().item()
    if err > tol:
        failures.append(f"{label}: max rel err {err:.2e} > {tol:.0e}")


def check_module(name: str, in_features: int, widths: tuple[int, ...], num_tokens: int,
                 dtype: torch.dtype, device: str, failures: list[str]) -> None:  # fmt: skip
    lens, ranks = _step(len(name) + num_tokens, num_tokens, 12)
    arena = _Arena(in_features, widths, ranks, dtype, device, seed=len(name))
    scaling = [math.nan if r == 0 else 1.0 + 0.1 * s for s, r in enumerate(ranks)]
    info = prepare_lora_batch_info(lens, arena.seg_rows, scaling, max_rank=MAX_RANK, device=device)
    slices, offs = len(widths), offsets(widths)
    x = torch.randn(num_tokens, in_features, device=device).to(dtype)
    y0 = torch.randn(num_tokens, offs[-1], device=device).to(dtype)
    v_ref = lora_reference.lora_shrink(x, arena.a_rows, info, slices)
    poisoned = torch.full_like(v_ref, math.nan)
    v = lora_shrink(x, arena.a_rows, info, slices, out=poisoned)
    defined = v_ref != 0
    _close(failures, f"{name} shrink", v[defined], v_ref[defined], 1e-4)
    if not bool(torch.isnan(v[~defined]).all()):
        failures.append(f"{name} shrink: wrote entries outside the segments' ranks")
    if int(info.counters.abs().sum()):
        failures.append(f"{name} shrink: split-K counters not re-armed")
    y_ref = y0.clone()
    lora_reference.lora_expand(v_ref, arena.bt_rows, y_ref, info, offs)
    y = y0.clone()
    lora_apply(x, y, arena.a_rows, arena.bt_rows, info, offs)
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # one bf16 rounding
    _close(failures, f"{name} apply", y, y_ref, tol)
    base = torch.repeat_interleave(torch.tensor([r == 0 for r in ranks]), torch.tensor(lens))
    if not torch.equal(y[base.to(device)], y0[base.to(device)]):
        failures.append(f"{name} apply: base rows changed")
    if slices == 2:
        act = lora_silu_mul(y0, v_ref, arena.bt_rows, info)
        _close(failures, f"{name} silu_mul", act,
               lora_reference.lora_silu_mul(y0, v_ref, arena.bt_rows, info), 2 * tol)  # fmt: skip


def check_graph_replay(modules: dict, dtype: torch.dtype, failures: list[str]) -> None:
    """Capture once on static buffers; new step contents per replay; compare; replay twice."""
    in_features, widths = modules["qkv"]
    offs, bucket = offsets(widths), 64
    steps = [_step(1, 64, 64), _step(2, 37, 20), ([2], [64]), ([0, 3, 0], [8, 64, 16])]
    all_ranks = [r for _, ranks in steps for r in ranks]
    arena = _Arena(in_features, widths, all_ranks, dtype, "cuda", seed=5)
    buffers = LoraBatchBuffers(max_tokens=bucket, max_segments=bucket, max_row_entries=64 * 64,
                               max_rank=MAX_RANK, device=torch.device("cuda"))  # fmt: skip
    info = buffers.info(bucket)
    x = torch.randn(bucket, in_features, device="cuda").to(dtype)
    y0 = torch.randn(bucket, offs[-1], device="cuda").to(dtype)
    y = y0.clone()

    def forward() -> None:
        y.copy_(y0)
        lora_apply(x, y, arena.a_rows, arena.bt_rows, info, offs)

    forward()  # compile off the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    used = 0
    for index, (lens, ranks) in enumerate(steps):
        rows = arena.seg_rows[used : used + len(ranks)]
        used += len(ranks)
        scaling = [0.5 + 0.01 * s for s in range(len(ranks))]
        buffers.fill(lens, rows, scaling)
        graph.replay()
        first = y.clone()
        graph.replay()
        if not torch.equal(first, y):
            failures.append(f"graph step {index}: replays differ (non-deterministic)")
        exact = prepare_lora_batch_info(lens, rows, scaling, max_rank=MAX_RANK, device="cuda")
        n = sum(lens)
        want = y0[:n].clone()
        lora_reference.lora_apply(x[:n], want, arena.a_rows, arena.bt_rows, exact, offs)
        _close(failures, f"graph step {index}", y[:n], want, 2**-7)
        if not torch.equal(y[n:], y0[n:]):
            failures.append(f"graph step {index}: rows past the step changed")
    if int(info.counters.abs().sum()):
        failures.append("graph: split-K counters not re-armed")


def intermediate_error(modules: dict, failures: list[str]) -> dict[str, float]:
    """Delta error against float64 from the same bf16 weights: rows path (float32 v) and the
    slot path (v rounded to bf16), q/k/v at 16 tokens over 4 adapters of rank 16."""
    in_features, widths = modules["qkv"]
    offs, lens, ranks = offsets(widths), [4, 4, 4, 4], [16, 16, 16, 16]
    arena = _Arena(in_features, widths, ranks, torch.bfloat16, "cuda", seed=9)
    scaling = [2.0] * 4
    info = prepare_lora_batch_info(lens, arena.seg_rows, scaling, max_rank=16, device="cuda")
    x = torch.randn(16, in_features, device="cuda").to(torch.bfloat16)
    a_stack = torch.stack([arena.a_rows[r].view(16, 3, -1).transpose(0, 1).reshape(48, -1)
                           for r in arena.seg_rows])  # fmt: skip
    b_stack = torch.stack([arena.bt_rows[r].T for r in arena.seg_rows]).contiguous()
    slot_info = prepare_slot_batch_info(lens, [0, 1, 2, 3], ranks, scaling, "cuda")
    y64 = torch.zeros(16, offs[-1], dtype=torch.float64, device="cuda")
    exact = prepare_lora_batch_info(lens, arena.seg_rows, scaling, max_rank=16, device="cuda")
    lora_reference.lora_apply(x.double(), y64, arena.a_rows.double(), arena.bt_rows.double(),
                              exact, offs)  # fmt: skip
    errors = {}
    for label, run in {
        "rows_fp32_v": lambda y: lora_apply(x, y, arena.a_rows, arena.bt_rows, info, offs),
        "slot_bf16_v": lambda y: triton_lora_forward(x, y, a_stack, b_stack, slot_info, offs),
    }.items():
        y = torch.zeros(16, offs[-1], dtype=torch.float32, device="cuda")
        run(y)
        errors[label] = ((y.double() - y64).norm() / y64.norm()).item()
    if errors["rows_fp32_v"] > errors["slot_bf16_v"]:
        failures.append(f"float32 intermediate not more accurate: {errors}")
    return errors


def run_checks(*, tiny: bool) -> list[str]:
    failures: list[str] = []
    cuda = torch.cuda.is_available()
    device, modules = ("cuda", MODULES) if cuda else ("cpu", TINY_MODULES)
    dtypes = [torch.bfloat16, torch.float16] if cuda else [torch.float32]
    for dtype in dtypes:
        for name, (in_features, widths) in modules.items():
            for num_tokens in (64, 200) if cuda else (9,):
                check_module(name, in_features, widths, num_tokens, dtype, device, failures)
    if cuda:
        check_graph_replay(modules, torch.bfloat16, failures)
        print("intermediate error vs float64:", intermediate_error(modules, failures))
    print("checks:", failures or "OK", flush=True)
    return failures
