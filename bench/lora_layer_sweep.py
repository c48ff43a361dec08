"""Launch-configuration sweep of the arena-row kernels for bench/lora_layer.py: each module's
shrink, expand and (gate/up) fused activation alone, per configuration, in graphs over cold
layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from lora_layer_setup import Setup, offsets
from lorasrv_kernels import (
    ActConfig,
    ExpandConfig,
    ShrinkConfig,
    lora_expand,
    lora_shrink,
    lora_silu_mul,
)

SHRINK: dict[str, ShrinkConfig] = {
    "default": ShrinkConfig(),
    "k64": ShrinkConfig(block_k=64),
    "k256": ShrinkConfig(block_k=256),
    "pps2": ShrinkConfig(programs_per_sm=2),
    "pps8": ShrinkConfig(programs_per_sm=8),
    "pps16": ShrinkConfig(programs_per_sm=16),
    "stages4": ShrinkConfig(num_stages=4),
    "k256_w8": ShrinkConfig(block_k=256, num_warps=8),
    "nosplit": ShrinkConfig(max_split=1),
}
EXPAND: dict[str, ExpandConfig] = {
    "default": ExpandConfig(),
    "r32": ExpandConfig(block_r=32),
    "r64": ExpandConfig(block_r=64),
    "n64": ExpandConfig(block_n=64),
    "n256": ExpandConfig(block_n=256),
    "pps4": ExpandConfig(programs_per_sm=4),
    "pps16": ExpandConfig(programs_per_sm=16),
    "stages3": ExpandConfig(num_stages=3),
    "n256_w8": ExpandConfig(block_n=256, num_warps=8),
    "bf16_v": ExpandConfig(exact_v=False),  # what the float32 intermediate costs
}
ACT: dict[str, ActConfig] = {
    "default": ActConfig(),
    "n128": ActConfig(block_n=128),
    "r32": ActConfig(block_r=32),
    "pps4": ActConfig(programs_per_sm=4),
    "pps16": ActConfig(programs_per_sm=16),
    "bf16_v": ActConfig(exact_v=False),
}

TimeFn = Callable[..., float]


def _time(rows: list[dict], label: dict, op: Callable[[int], None], num_layers: int,
          time_layers: TimeFn) -> None:  # fmt: skip
    try:
        us = time_layers(op, num_layers)
    except Exception as exc:  # one bad configuration must not lose the rest
        rows.append({**label, "error": repr(exc)})
        return
    rows.append({**label, "us": round(us, 2)})
    print(f"  sweep {label} {us:8.2f} us", flush=True)


def run_sweep(setup: Setup, num_layers: int, time_layers: TimeFn) -> list[dict]:
    rows: list[dict] = []
    for name in setup.modules:
        _sweep_module(setup, name, num_layers, time_layers, rows)
    return rows


Tuned = dict[tuple[str, str], ShrinkConfig | ExpandConfig | ActConfig]


def best_configs(rows: list[dict]) -> Tuned:
    """Fastest configuration per (module, op), among those that keep the float32 v."""
    tables = {"shrink": SHRINK, "expand": EXPAND, "act": ACT}
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for row in rows:
        key = (row["module"], row["op"])
        if "us" in row and row["config"] != "bf16_v" and row["us"] < best.get(key, (1e9, ""))[0]:
            best[key] = (row["us"], row["config"])
    return {key: tables[key[1]][name] for key, (_, name) in best.items()}  # type: ignore[misc]


def _sweep_module(setup: Setup, name: str, num_layers: int, time_layers: TimeFn,
                  rows: list[dict]) -> None:  # fmt: skip
    info, layers = setup.rows_bucket, setup.layers
    widths = setup.modules[name][1]
    x, num_slices, offs = setup.x[name], len(widths), offsets(widths)
    for cfg_name, shrink_cfg in SHRINK.items():

        def shrink(li: int, cfg: ShrinkConfig = shrink_cfg) -> None:
            lora_shrink(x, layers[li].a_rows[name], info, num_slices, config=cfg)

        _time(rows, {"module": name, "op": "shrink", "config": cfg_name}, shrink, num_layers,
              time_layers)  # fmt: skip
    v = lora_shrink(x, layers[0].a_rows[name], info, num_slices)
    y = torch.zeros(x.shape[0], offs[-1], dtype=x.dtype, device=x.device)
    for cfg_name, expand_cfg in EXPAND.items():

        def expand(li: int, cfg: ExpandConfig = expand_cfg) -> None:
            lora_expand(v, layers[li].bt_rows[name], y, info, offs, config=cfg)

        _time(rows, {"module": name, "op": "expand", "config": cfg_name}, expand, num_layers,
              time_layers)  # fmt: skip
    if name != "gate_up":
        return
    for cfg_name, act_cfg in ACT.items():

        def act(li: int, cfg: ActConfig = act_cfg) -> None:
            lora_silu_mul(y, v, layers[li].bt_rows[name], info, config=cfg)

        _time(rows, {"module": name, "op": "act", "config": cfg_name}, act, num_layers,
              time_layers)  # fmt: skip
