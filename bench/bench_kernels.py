"""Benchmark the Triton SGMV LoRA ops against the torch reference at Llama-3-8B shapes.

CUDA only (prints "no CUDA: skipped" and exits 0 elsewhere). Checks correctness first, then
prints time, speedup and achieved GB/s per op, and writes the rows to --out (default: scratch).
Run: python bench/bench_kernels.py [--dtype bf16|fp16]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from lorasrv_kernels import SlotBatchInfo

# in_features, slice output sizes (Llama-3-8B: hidden 4096, q 4096, k/v 1024, intermediate 14336)
MODULES: dict[str, tuple[int, tuple[int, ...]]] = {
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
    "o": (4096, (4096,)),
    "down": (14336, (4096,)),
}
MAX_RANK = 16
# (num_tokens, num_adapters): decode batches, then one prefill batch.
SHAPES = [(t, n) for t in (1, 16, 64, 256) for n in (1, 8, 32)] + [(4096, 8)]
# NOTE: a scratch path, so a run never overwrites the committed bench/results/ unless --out says so
RESULTS_PATH = Path(tempfile.gettempdir()) / "lorasrv-bench" / "kernels.json"


class BenchInputs(NamedTuple):
    x: torch.Tensor  # [num_tokens, in_features]
    y: torch.Tensor  # [num_tokens, out_total]
    a_stack: torch.Tensor  # [num_slots, num_slices * MAX_RANK, in_features]
    b_stack: torch.Tensor  # [num_slots, out_total, MAX_RANK]
    info: SlotBatchInfo
    slice_offsets: tuple[int, ...]
    num_segments: int


def make_inputs(module: str, num_tokens: int, num_adapters: int, dtype: torch.dtype) -> BenchInputs:
    from lorasrv_kernels import prepare_slot_batch_info

    in_features, slice_sizes = MODULES[module]
    num_slices, out_total = len(slice_sizes), sum(slice_sizes)
    num_slots = max(8, num_adapters)
    num_segments = min(num_tokens, num_adapters)  # a 1-token batch holds one adapter
    seg_lens = [num_tokens // num_segments] * num_segments
    seg_lens[0] += num_tokens - sum(seg_lens)
    dev = "cuda"
    a_stack = torch.randn(num_slots, num_slices * MAX_RANK, in_features, device=dev, dtype=dtype)
    a_stack /= math.sqrt(in_features)
    offsets = [0]
    for size in slice_sizes:
        offsets.append(offsets[-1] + size)
    return BenchInputs(
        x=torch.randn(num_tokens, in_features, device=dev, dtype=dtype),
        y=torch.randn(num_tokens, out_total, device=dev, dtype=dtype),
        a_stack=a_stack,
        b_stack=torch.randn(num_slots, out_total, MAX_RANK, device=dev, dtype=dtype) / 4,
        info=prepare_slot_batch_info(
            seg_lens, list(range(num_segments)), [MAX_RANK] * num_slots, [2.0] * num_slots, dev
        ),
        slice_offsets=tuple(offsets),
        num_segments=num_segments,
    )


def op_bytes(module: str, num_tokens: int, num_segments: int, elem_bytes: int) -> dict[str, int]:
    """Bytes each op must move: x read, A/B rows of the distinct slots, v, y read + write."""
    in_features, slice_sizes = MODULES[module]
    v_width, out_total = len(slice_sizes) * MAX_RANK, sum(slice_sizes)
    x = num_tokens * in_features
    a = num_segments * v_width * in_features
    b = num_segments * out_total * MAX_RANK
    v = num_tokens * v_width
    y = 2 * num_tokens * out_total
    return {
        "shrink": (x + a + v) * elem_bytes,
        "expand": (v + b + y) * elem_bytes,
        "lora_forward": (x + a + 2 * v + b + y) * elem_bytes,  # v written, then read back
    }


def bench_case(
    module: str, num_tokens: int, num_adapters: int, dtype: torch.dtype
) -> list[dict[str, object]]:
    import triton.testing
    from lorasrv_kernels import reference, sgmv_expand, sgmv_shrink, triton_lora_forward

    inp = make_inputs(module, num_tokens, num_adapters, dtype)
    x, y, a_stack, b_stack, info, offsets, num_segments = inp
    num_slices = len(offsets) - 1

    # Correctness before timing.
    v_ref = reference.sgmv_shrink(x, a_stack, info, num_slices)
    v_tri = sgmv_shrink(x, a_stack, info, num_slices)
    y_ref, y_tri = y.clone(), y.clone()
    reference.lora_forward(x, y_ref, a_stack, b_stack, info, offsets)
    triton_lora_forward(x, y_tri, a_stack, b_stack, info, offsets)
    y_exp = y.clone()
    sgmv_expand(v_ref, b_stack, y_exp, info, offsets)
    err = {
        "shrink": (v_tri.float() - v_ref.float()).abs().max().item(),
        "expand": (y_exp.float() - y_ref.float()).abs().max().item(),
        "lora_forward": (y_tri.float() - y_ref.float()).abs().max().item(),
    }

    y_work = y.clone()  # expand timings keep adding into it; only the time matters
    fns: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "shrink": (
            lambda: sgmv_shrink(x, a_stack, info, num_slices),
            lambda: reference.sgmv_shrink(x, a_stack, info, num_slices),
        ),
        "expand": (
            lambda: sgmv_expand(v_ref, b_stack, y_work, info, offsets),
            lambda: reference.sgmv_expand(v_ref, b_stack, y_work, info, offsets),
        ),
        "lora_forward": (
            lambda: triton_lora_forward(x, y_work, a_stack, b_stack, info, offsets),
            lambda: reference.lora_forward(x, y_work, a_stack, b_stack, info, offsets),
        ),
    }
    nbytes = op_bytes(module, num_tokens, num_segments, x.element_size())
    rows: list[dict[str, object]] = []
    for op, (triton_fn, ref_fn) in fns.items():
        triton_us = float(triton.testing.do_bench(triton_fn, warmup=25, rep=100)) * 1e3
        ref_us = float(triton.testing.do_bench(ref_fn, warmup=25, rep=100)) * 1e3
        rows.append({
            "module": module, "op": op, "dtype": str(dtype).removeprefix("torch."),
            "num_tokens": num_tokens, "num_adapters": num_adapters,
            "num_segments": num_segments, "triton_us": round(triton_us, 2),
            "reference_us": round(ref_us, 2), "speedup": round(ref_us / triton_us, 2),
            "triton_gbps": round(nbytes[op] / (triton_us * 1e-6) / 1e9, 1),
            "max_abs_err": err[op],
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_PATH, help="JSON rows (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA: skipped")
        return 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    header = (
        f"{'module':<8}{'op':<13}{'T':>6}{'ad':>4}{'triton us':>11}{'ref us':>11}"
        f"{'speedup':>9}{'GB/s':>9}{'max err':>10}"
    )
    print(f"{torch.cuda.get_device_name()}  dtype={args.dtype}  max_rank={MAX_RANK}")
    print(header)
    all_rows = []
    for module in MODULES:
        for num_tokens, num_adapters in SHAPES:
            for row in bench_case(module, num_tokens, num_adapters, dtype):
                all_rows.append(row)
                print(
                    f"{row['module']:<8}{row['op']:<13}{row['num_tokens']:>6}"
                    f"{row['num_adapters']:>4}{row['triton_us']:>11.1f}{row['reference_us']:>11.1f}"
                    f"{row['speedup']:>9.2f}{row['triton_gbps']:>9.1f}{row['max_abs_err']:>10.2e}",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(all_rows, indent=1) + "\n")
    print(f"wrote {len(all_rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
