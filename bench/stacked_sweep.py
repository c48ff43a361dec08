"""Stacked-LoRA sweep: per Llama-3-8B module, inside a CUDA graph, the base GEMM alone, the
two-op LoRA path (GEMM + shrink + expand) and the stacked path (one GEMM over `[W; A]` + one
expand) over expand tile shapes; for gate/up also with the activation, separate or fused with
the LoRA delta. Decode sizes and prefill chunks (512, 2048 tokens: where the stacked path stops).
Prints one row per configuration; `--json` keeps them. GPU only (launch gaps and HBM bytes).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lora_sweep import MODULES, batch_info, time_in_graph
from lorasrv_kernels import SlotBatchInfo, silu_mul, silu_mul_lora, triton_lora_forward
from lorasrv_kernels.lora_expand import _launch_expand

RANK, SLOTS = 16, 8
# (BLOCK_M, BLOCK_N, num_warps); None = the launcher's own table
TILES: list[tuple[int, int, int] | None] = [
    None, (16, 64, 4), (16, 128, 4), (16, 256, 4), (16, 256, 8), (64, 128, 4), (64, 256, 8),
]  # fmt: skip


def module_ops(module: str, num_tokens: int, info: SlotBatchInfo) -> dict[str, Callable[[], None]]:
    in_features, widths = MODULES[module]
    offsets = [0]
    for width in widths:
        offsets.append(offsets[-1] + width)
    out_total, num_slices = offsets[-1], len(widths)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(num_tokens, in_features, device=dev, dtype=dt)
    stacked = torch.randn(out_total + SLOTS * num_slices * RANK, in_features, device=dev, dtype=dt)
    stacked *= 0.02
    weight = stacked[:out_total]
    a = stacked[out_total:].view(SLOTS, num_slices * RANK, in_features)
    b = torch.randn(SLOTS, out_total, RANK, device=dev, dtype=dt) * 0.02

    def base() -> None:
        F.linear(x, weight)

    def two_op() -> None:
        y = F.linear(x, weight)
        triton_lora_forward(x, y, a, b, info, tuple(offsets))

    ops = {"base": base, "two_op": two_op}
    if module == "gate_up":  # the activation's cost comes along: the fused kernel replaces it

        def base_act() -> None:
            silu_mul(F.linear(x, weight))

        def stacked_act() -> None:
            wide = F.linear(x, stacked)
            y, v_all = wide[:, :out_total], wide[:, out_total:]
            _launch_expand(v_all[None], b, y, info, tuple(offsets), slot_cols=num_slices * RANK)
            silu_mul(y)

        def fused_act() -> None:
            wide = F.linear(x, stacked)
            silu_mul_lora(wide[:, :out_total], wide[:, out_total:], b, info)

        ops |= {"base+act": base_act, "stacked+act": stacked_act, "fused_act": fused_act}
    tiles = TILES if num_tokens <= 64 else [None]
    for tile in tiles:

        def op(tile: tuple[int, int, int] | None = tile) -> None:
            wide = F.linear(x, stacked)
            y, v_all = wide[:, :out_total], wide[:, out_total:]
            slot_cols = num_slices * RANK
            if tile is None:
                _launch_expand(v_all[None], b, y, info, tuple(offsets), slot_cols=slot_cols)
            else:
                _launch_expand(v_all[None], b, y, info, tuple(offsets), slot_cols=slot_cols,
                               tile=tile[:2], num_warps=tile[2])  # fmt: skip

        ops["stacked" if tile is None else "stacked_{}x{}_w{}".format(*tile)] = op
    return ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("stacked_sweep: needs CUDA")
        return 0
    rows = []
    # decode graph buckets: the segment bound is the bucket (the kernels mask shorter segments)
    for num_tokens, num_adapters in [(64, 8), (16, 8), (1, 1), (512, 8), (2048, 8)]:
        info = batch_info(num_tokens, num_adapters, SLOTS + 1, "cuda")
        if num_tokens <= 64:  # a decode graph bucket bounds its segments by the bucket
            info = info._replace(max_seg_len=num_tokens)
        else:
            info = info._replace(max_seg_len=num_tokens // num_adapters)
        for module in MODULES:
            for name, op in module_ops(module, num_tokens, info).items():
                try:
                    us = time_in_graph(op)
                except Exception as exc:  # one bad configuration must not lose the rest
                    print(f"{module} T={num_tokens} {name}: {exc!r}")
                    continue
                rows.append({"module": module, "num_tokens": num_tokens,
                             "num_adapters": num_adapters, "op": name,
                             "us": round(us, 2)})  # fmt: skip
                print(f"{module:8} T={num_tokens:<3} n={num_adapters:<2} {name:22} {us:8.2f} us",
                      flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
