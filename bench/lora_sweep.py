"""LoRA decode-kernel sweep: time `triton_lora_forward` inside a CUDA graph (so Python launch cost
is excluded, as in served decode) at Llama-3-8B decode shapes, over split-K choices and with the
split-K partials summed before the expand. Prints one row per configuration; CPU: a tiny smoke run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lorasrv_kernels import SlotBatchInfo
from lorasrv_kernels.lora_expand import expand_partials
from lorasrv_kernels.lora_shrink import shrink_partials

# name: (in_features, slice widths) at Llama-3-8B sizes
MODULES = {
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
    "o": (4096, (4096,)),
    "down": (14336, (4096,)),
}


def batch_info(num_tokens: int, num_adapters: int, bound: int, device: str) -> SlotBatchInfo:
    """`num_adapters` equal segments plus padding segments, as a decode graph bucket has."""
    per = num_tokens // num_adapters
    indptr = [i * per for i in range(num_adapters)] + [num_tokens]
    slots = list(range(num_adapters))
    num_segments = min(bound, num_adapters + 1)
    indptr += [num_tokens] * (num_segments - num_adapters)
    slots += [-1] * (num_segments - num_adapters)
    return SlotBatchInfo(
        seg_indptr=torch.tensor(indptr, dtype=torch.int32, device=device),
        seg_slot=torch.tensor(slots, dtype=torch.int32, device=device),
        slot_rank=torch.full((max(num_adapters, 1),), 16, dtype=torch.int32, device=device),
        slot_scaling=torch.ones(max(num_adapters, 1), dtype=torch.float32, device=device),
        max_seg_len=bound,
    )


def make_op(module: str, num_tokens: int, num_adapters: int, split_k: int | None, presum: bool,
            device: str, dtype: torch.dtype) -> tuple[Callable[[], None], int]:  # fmt: skip
    in_features, widths = MODULES[module]
    rank, slots = 16, max(num_adapters, 1)
    offsets = [0]
    for width in widths:
        offsets.append(offsets[-1] + width)
    x = torch.randn(num_tokens, in_features, device=device, dtype=dtype)
    y = torch.zeros(num_tokens, offsets[-1], device=device, dtype=dtype)
    a = torch.randn(slots, len(widths) * rank, in_features, device=device, dtype=dtype) * 0.02
    b = torch.randn(slots, offsets[-1], rank, device=device, dtype=dtype) * 0.02
    info = batch_info(num_tokens, num_adapters, num_tokens, device)

    def op() -> None:
        parts = shrink_partials(x, a, info, len(widths), split_k=split_k, zero_fill=False)
        if presum and parts.shape[0] > 1:
            parts = parts.sum(0, keepdim=True).to(dtype)
        expand_partials(parts, b, y, info, tuple(offsets))

    num_bytes = (x.numel() + y.numel() * 2 + a.numel() + b.numel()) * x.element_size()
    return op, num_bytes


def time_in_graph(op: Callable[[], None], repeats: int = 200) -> float:
    """Microseconds per call, replaying a graph of `repeats` calls (launch gaps as in serving)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            op()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            op()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / repeats)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = [(1, 1), (16, 8), (64, 8), (64, 32)] if cuda else [(4, 2)]
    choices: list[tuple[int | None, bool]] = [(None, False), (None, True)]
    choices += [(k, False) for k in (1, 2, 4, 8, 16)] + [(k, True) for k in (4, 8, 16)]
    rows = []
    print(f"{'module':8} {'T':>4} {'n':>3} {'split_k':>7} {'presum':>6} {'us':>8} {'GB/s':>8}")
    for module in MODULES if cuda else ("o",):
        for num_tokens, num_adapters in shapes:
            for split_k, presum in choices:
                try:
                    op, num_bytes = make_op(module, num_tokens, num_adapters, split_k, presum,
                                            device, dtype)  # fmt: skip
                    if cuda:
                        us = time_in_graph(op)
                    else:
                        started = time.perf_counter()
                        op()
                        us = (time.perf_counter() - started) * 1e6
                except Exception as exc:  # one bad configuration must not lose the rest
                    print(f"{module} T={num_tokens} n={num_adapters} {split_k} {presum}: {exc!r}")
                    continue
                gbps = num_bytes / us / 1e3
                rows.append(
                    {"module": module, "num_tokens": num_tokens, "num_adapters": num_adapters,
                     "split_k": split_k or 0, "presum": presum, "us": round(us, 2),
                     "gbps": round(gbps, 1)}
                )  # fmt: skip
                label = "auto" if split_k is None else str(split_k)
                print(f"{module:8} {num_tokens:>4} {num_adapters:>3} {label:>7} {presum!s:>6} "
                      f"{us:>8.2f} {gbps:>8.1f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
