"""One decoder layer's LoRA (q/k/v + o + gate/up + down) at Llama-3-8B shapes in bf16, inside a
CUDA graph with cold weights: the arena-row kernels against the slot-based two-op and stacked
paths, on the same shapes in the same run; prints µs per layer, the byte floor, a short table.

Each path's LoRA cost is (its layer) - (the base layer: the four GEMMs and SiLU-and-multiply),
both timed in graphs over `--layers` distinct layers (weights never warm in L2). `rows` is what
the model runs (`lora_apply` per module on static graph buffers, then `silu_mul`); its cost is
`lora_layer_us_<case>`. `hot` is the runner's hot A cache where the step's adapters fit its
128 hot rows (a `[W; A_hot]` GEMM, `lora_expand_cols`, gate/up's `lora_silu_mul_cols`).
Measured on an H100 (see the report in docs/architecture.md). `--check` runs bf16 checks first
(reference, poisoned outputs, NaN arena rows, graph replay with new contents);
`--sweep` times launch configurations per module. `--smoke`: a tiny eager run on CPU.
Usage: python bench/lora_layer.py --check --sweep --out /tmp/lora_layer.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lora_layer_checks import run_checks
from lora_layer_setup import CASES, HOT_ROWS, Case, Setup, build, byte_floor, offsets, weight
from lora_layer_sweep import Tuned, best_configs, run_sweep
from lorasrv_kernels import (
    LoraBatchInfo,
    SlotBatchInfo,
    lora_expand,
    lora_expand_cols,
    lora_shrink,
    lora_silu_mul,
    lora_silu_mul_cols,
    sgmv_expand_stacked,
    silu_mul,
    silu_mul_lora,
    triton_lora_forward,
)

LayerOp = Callable[[int], None]
TARGETS_US = {"t64_n64_mixed": 266.0, "t256_n64_mixed": 345.0}  # H100, issue 12


def time_layers(op: LayerOp, num_layers: int, *, repeats: int = 2, replays: int = 15) -> float:
    """Median µs per layer over graph replays; each replay walks every layer `repeats` times."""
    if not torch.cuda.is_available():  # --smoke: run once, eagerly
        started = time.perf_counter()
        for layer in range(num_layers):
            op(layer)
        return (time.perf_counter() - started) * 1e6 / num_layers
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles, cuBLAS heuristics
        for layer in range(num_layers):
            op(layer)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for layer in range(num_layers):
                op(layer)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (repeats * num_layers))
    del graph
    return statistics.median(times)


def layer_paths(setup: Setup, tuned: Tuned | None = None) -> dict[str, LayerOp]:
    """Every path as `op(layer)`; outputs are discarded (timing only). With `tuned`, only the
    arena-row paths with those per-module configurations."""
    x, mods = setup.x, setup.modules
    offs = {name: offsets(widths) for name, (_, widths) in mods.items()}

    def base(li: int) -> None:
        layer = setup.layers[li]
        for name in ("qkv", "o", "down"):
            F.linear(x[name], weight(layer, name, mods))
        silu_mul(F.linear(x["gate_up"], weight(layer, "gate_up", mods)))

    def rows(info: LoraBatchInfo, fused: bool, with_base: bool = True,
             tuned: Tuned | None = None) -> LayerOp:  # fmt: skip
        cfg = tuned or {}

        def op(li: int) -> None:  # lora_apply = lora_shrink + lora_expand, configs spelled out
            layer = setup.layers[li]
            for name in ("qkv", "o", "down", "gate_up"):
                x_m, num_slices = x[name], len(offs[name]) - 1
                y = (F.linear(x_m, weight(layer, name, mods)) if with_base
                     else x_m.new_empty(x_m.shape[0], offs[name][-1]))  # fmt: skip
                v = lora_shrink(x_m, layer.a_rows[name], info, num_slices,
                                config=cfg.get((name, "shrink")))  # type: ignore[arg-type]  # fmt: skip
                if name == "gate_up" and fused and with_base:
                    lora_silu_mul(y, v, layer.bt_rows[name], info,
                                  config=cfg.get((name, "act")))  # type: ignore[arg-type]  # fmt: skip
                    continue
                lora_expand(v, layer.bt_rows[name], y, info, offs[name],
                            config=cfg.get((name, "expand")))  # type: ignore[arg-type]  # fmt: skip
                if name == "gate_up" and with_base:
                    silu_mul(y)

        return op

    def slot_two_op(info: SlotBatchInfo) -> LayerOp:
        def op(li: int) -> None:
            layer = setup.layers[li]
            for name in ("qkv", "o", "down", "gate_up"):
                in_features = mods[name][0]
                y = F.linear(x[name], weight(layer, name, mods))
                a_stack = layer.stacked[name][offs[name][-1] :].view(
                    layer.b_stack[name].shape[0], -1, in_features
                )
                triton_lora_forward(x[name], y, a_stack, layer.b_stack[name], info, offs[name])
                if name == "gate_up":
                    silu_mul(y)

        return op

    def slot_stacked(info: SlotBatchInfo) -> LayerOp:
        def op(li: int) -> None:  # as layers.py runs steps of <= 512 tokens
            layer = setup.layers[li]
            for name in ("qkv", "o", "down", "gate_up"):
                out_total = offs[name][-1]
                wide = F.linear(x[name], layer.stacked[name])
                y, v_all = wide[:, :out_total], wide[:, out_total:]
                if name == "gate_up":
                    silu_mul_lora(y, v_all, layer.b_stack[name], info)
                else:
                    sgmv_expand_stacked(v_all, layer.b_stack[name], y, info, offs[name])

        return op

    def hot(info: LoraBatchInfo, fused: bool) -> LayerOp:
        def op(li: int) -> None:  # as the runner's hot A cache: [W; A_hot] GEMM + expand_cols
            layer = setup.layers[li]
            for name in ("qkv", "o", "down", "gate_up"):
                out, num_slices = offs[name][-1], len(offs[name]) - 1
                # the slot stack's first slices * HOT_ROWS A rows stand in for the hot rows
                wide = F.linear(x[name], layer.stacked[name][: out + num_slices * HOT_ROWS])
                y, v = wide[:, :out], wide[:, out:]
                if name == "gate_up" and fused:
                    lora_silu_mul_cols(y, v, layer.bt_rows[name], info, HOT_ROWS)
                    continue
                lora_expand_cols(v, layer.bt_rows[name], y, info, offs[name], HOT_ROWS)
                if name == "gate_up":
                    silu_mul(y)

        return op

    hot_paths = {}
    if setup.hot_bucket is not None:
        hot_paths = {"hot": hot(setup.hot_bucket, fused=True),
                     "hot_unfused_act": hot(setup.hot_bucket, fused=False)}  # fmt: skip
    if tuned is not None:
        return {
            "rows_tuned": rows(setup.rows_bucket, fused=False, tuned=tuned),
            "rows_tuned_fused_act": rows(setup.rows_bucket, fused=True, tuned=tuned),
        }
    return {
        "base": base,
        # what the model runs: lora_apply per module + silu_mul, static graph buffers
        "rows": rows(setup.rows_bucket, fused=False),
        "rows_fused_act": rows(setup.rows_bucket, fused=True),
        "rows_exact_info": rows(setup.rows_exact, fused=False),
        "rows_kernels_only": rows(setup.rows_bucket, fused=False, with_base=False),
        "slot_two_op": slot_two_op(setup.slot_padded),
        "slot_two_op_exact": slot_two_op(setup.slot_exact),
        "slot_stacked": slot_stacked(setup.slot_padded),
        "slot_stacked_exact": slot_stacked(setup.slot_exact),
        **hot_paths,
    }


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the byte floor's bandwidth)."""
    if not torch.cuda.is_available():
        return 3.0e12
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1000)


def run_case(name: str, case: Case, args: argparse.Namespace, bandwidth: float) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setup = build(case, num_layers=args.layers, device=device, tiny=args.smoke)
    row: dict = {"case": name, "floor_bytes": byte_floor(case, setup)}
    row["floor_us"] = row["floor_bytes"] / bandwidth * 1e6
    time_paths(name, layer_paths(setup), args.layers, row)
    if args.sweep and name in (*TARGETS_US, "t64_n8_r16"):
        row["sweep"] = run_sweep(setup, args.layers, time_layers)
        tuned = best_configs(row["sweep"])
        row["tuned"] = {f"{m}.{op}": cfg._asdict() for (m, op), cfg in tuned.items()}
        time_paths(name, layer_paths(setup, tuned), args.layers, row)
    base = row.get("base_us", 0.0)
    for path in [key[: -len("_us")] for key in row if key.endswith("_us")]:
        if path not in ("base", "rows_kernels_only", "floor"):
            row[f"{path}_lora_us"] = row[f"{path}_us"] - base
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()
                      if k not in ("sweep", "tuned")}), flush=True)  # fmt: skip
    del setup
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def time_paths(case: str, paths: dict[str, LayerOp], num_layers: int, row: dict) -> None:
    for path, op in paths.items():
        try:
            row[f"{path}_us"] = time_layers(op, num_layers)
        except Exception as exc:  # one failing path must not lose the rest
            row[f"{path}_error"] = repr(exc)
            print(f"{case} {path}: {exc!r}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lora_layer.json"))
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, no graphs")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("lora_layer: needs CUDA (or --smoke under TRITON_INTERPRET=1)")
        return 0
    result: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    failures = run_checks(tiny=args.smoke) if args.check else []
    result["check_failures"] = failures
    bandwidth = copy_bandwidth()
    result["copy_bandwidth_gbps"] = bandwidth / 1e9
    result["cases"] = []
    for name in args.cases:  # results written after each case: a late failure loses nothing
        try:
            row = run_case(name, CASES[name], args, bandwidth)
        except Exception as exc:
            print(f"{name}: {exc!r}", flush=True)
            row = {"case": name, "error": repr(exc), "floor_us": float("nan")}
        result["cases"].append(row)
        if "rows_lora_us" in row:  # the committed defaults; tuned figures stay in the case row
            result[f"lora_layer_us_{name}"] = round(row["rows_lora_us"], 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print_table(result)
    return 1 if failures else 0


def print_table(result: dict) -> None:
    checks = result["check_failures"] or "OK"
    print(f"\n{result['device']}, copy {result['copy_bandwidth_gbps']:.0f} GB/s; checks: {checks}")
    cols = ["rows", "rows_fused_act", "rows_tuned", "hot", "hot_unfused_act", "slot_two_op",
            "slot_stacked", "slot_stacked_exact"]  # fmt: skip
    print(f"{'case (LoRA us/layer)':20} {'floor':>6} " + " ".join(f"{c[:12]:>12}" for c in cols))
    for row in result["cases"]:
        cells = " ".join(f"{row.get(f'{c}_lora_us', float('nan')):>12.1f}" for c in cols)
        print(f"{row['case']:20} {row['floor_us']:>6.1f} {cells}")
    for key, target in TARGETS_US.items():
        got = result.get(f"lora_layer_us_{key}")
        print(f"lora_layer_us_{key} = {got} (target <= {target})")


if __name__ == "__main__":
    sys.exit(main())
