"""The GPU side of many_sim.py as numbers: an H100's arena geometry for a Llama-3-8B-shaped model
and a step-time cost model fitted to bench_many.py's H100 run (c56617a). Pure: stdlib only.

Fit (see `H100`): base decode at 64 rows and ~190 tokens of context per row took 7.3 ms per step
(the run's byte-floor fraction 0.761 over 514 steps); with adapters, a decode step costs a fixed
LoRA overhead plus a cost per distinct adapter and per byte of its rows (zipf64: 27 adapters,
11.0 ms; uniform64: 39.9, 12.1 ms; zipf64 cap 8: 7.8 adapters at ~11 rows, 8.8 ms); prefill
costs per token (compute-bound) and per adapter segment. `many_sim.calibration` replays the
runs and prints measured against predicted.
"""

from __future__ import annotations

from typing import NamedTuple

from lorasrv.messages import RunnerReady

GIB = 1 << 30


class Shape(NamedTuple):
    hidden: int = 4096
    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    element: int = 2  # bf16
    decode_weight_bytes: int = 14_964_000_000  # every weight but the embedding rows


LLAMA3_8B = Shape()
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = (*ATTN, "gate_proj", "up_proj", "down_proj")


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def row_bytes(shape: Shape, targets: tuple[str, ...]) -> int:
    """One rank-row of an adapter over every layer and pool module its targets need (the
    arena's row layout: A part slices*in, B part out_total, each padded to 8 elements)."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    pools = {  # pool module: (slices, in, out_total), present when any member is targeted
        ("q_proj", "k_proj", "v_proj"): (3, h, h + 2 * kv),
        ("o_proj",): (1, h, h),
        ("gate_proj", "up_proj"): (2, h, 2 * shape.intermediate),
        ("down_proj",): (1, shape.intermediate, h),
    }
    elems = sum(
        _pad8(s * i) + _pad8(o)
        for members, (s, i, o) in pools.items()
        if set(members) & set(targets)
    )
    return elems * shape.layers * shape.element


def kv_token_bytes(shape: Shape) -> int:
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * shape.element


def h100_ready(targets: tuple[str, ...], max_rank: int, *, arena_bytes: int = 50 * GIB,
               page_size: int = 16, shape: Shape = LLAMA3_8B) -> RunnerReady:  # fmt: skip
    """What the runner reports on an H100 (80 GB, --mem-fraction-static 0.85, 16 GB of weights)."""
    page_bytes = kv_token_bytes(shape) * page_size
    num_pages = arena_bytes // page_bytes
    lora_row = row_bytes(shape, targets)
    return RunnerReady(
        num_kv_pages=num_pages,
        page_size=page_size,
        kv_page_bytes=page_bytes,
        lora_row_bytes=lora_row,
        lora_max_rows=num_pages * page_bytes // lora_row,
        max_lora_rank=max_rank,
        lora_target_modules=targets,
        vocab_size=128256,
        context_length=131072,
        eos_token_ids=(0,),
        device="cuda",
        dtype="bfloat16",
    )


class StepShape(NamedTuple):
    """What a step's time depends on."""

    is_decode: bool
    rows: int
    new_tokens: int  # tokens computed (decode: = rows)
    context_tokens: int  # tokens of KV read (every row's context, new tokens included)
    num_adapters: int  # distinct adapters the rows use
    adapter_bytes: int  # their rows' bytes (true ranks)


class CostModel(NamedTuple):
    """Seconds per step. Decode: weights + KV read + LoRA; prefill: compute-bound tokens.
    Fitted to the H100 run (see the module's docstring and `many_sim.calibrate`)."""

    fixed_s: float = 6.70e-3  # weights read once (15 GB) + launches: decode at any batch
    context_token_s: float = 4.5e-8  # KV read per token of context (128 KiB at ~2.9 TB/s)
    row_s: float = 0.0  # per decode row (not separable from the fixed cost in the fit)
    lora_fixed_s: float = 1.2e-3  # a step with any adapter: metadata, extra launches
    adapter_s: float = 0.0  # per distinct adapter (not separable from its bytes in the fit)
    lora_bytes_per_s: float = 1.7e12  # adapter rows read by the row kernels
    prefill_token_s: float = 2.4e-5  # prefill compute per token (~16 GFLOP at ~670 TFLOP/s)
    prefill_adapter_s: float = 6.5e-4  # per distinct adapter in a prefill step

    def step_s(self, step: StepShape) -> float:
        lora = 0.0
        if step.num_adapters:
            per_adapter = self.adapter_s if step.is_decode else self.prefill_adapter_s
            lora = (
                self.lora_fixed_s
                + per_adapter * step.num_adapters
                + step.adapter_bytes / self.lora_bytes_per_s
            )
        kv = self.context_token_s * step.context_tokens
        if step.is_decode:
            return self.fixed_s + self.row_s * step.rows + kv + lora
        return max(self.fixed_s, self.prefill_token_s * step.new_tokens) + kv + lora


class HostModel(NamedTuple):
    """Host side: adapter folders read back from disk, and host-to-device uploads."""

    load_s: float = 0.05  # one adapter folder read, checked and packed (pinned)
    load_workers: int = 4  # loads that proceed at once (threads, GIL)
    upload_bytes_per_s: float = 25e9  # pinned host-to-device copies on the side stream
    hop_s: float = 2e-4  # one actor hop on the event loop (client <-> engine <-> actors)


H100 = CostModel()
