"""Many adapters at once, engine level: adapter traffic over base traffic, same engine, same run.

Random Llama-3-8B-shaped bf16 weights drawn on the GPU (bench_model.py). Three engines:
- 64 adapters on all seven projections, ranks cycling 8/16/32/64, default flags: base, Zipf
  (alpha 1) and uniform popularity -> many_zipf64_vs_base, many_uniform64_vs_base;
- the same with --max-loras-per-batch 8: base, Zipf -> many_zipf64_cap8_vs_base;
- 1,000 registered (q/k/v/o, ranks 8/16), --max-loaded-loras bounding host copies: base, Zipf
  -> many_1000_vs_base, many_cold_ttft_ratio (TTFT p50 of requests whose adapter was not on the
  GPU when submitted, over those whose adapter was).
Each run: 256 requests of 128 prompt + 128 new tokens at concurrency 64; output tok/s, TTFT, the
distinct adapters per decode step and the decode steps' byte-floor fraction (weights + KV +
the step's adapters at their rank, over measured copy bandwidth, per step interval).

GPU:  python bench/bench_many.py --out $OUT/bench_many.json   (one H100/H200, under 10 minutes)
CPU:  python bench/bench_many.py --small                       (tiny model: checks the script)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
ATTN: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


# ----------------------------------------------------------------------------- arguments


def default_out() -> Path:
    root = os.environ.get("OUT") or tempfile.gettempdir()
    return Path(root) / "bench_many.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny model on CPU: checks the script")
    p.add_argument("--out", type=Path, default=None, help="JSON results ($OUT or /tmp by default)")
    p.add_argument("--requests", type=int, help="requests per run (256; small: 16)")
    p.add_argument("--concurrency", type=int, help="requests in flight (64; small: 8)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (128; small: 8)")
    p.add_argument("--new-tokens", type=int, help="new tokens per request (128; small: 4)")
    p.add_argument("--num-adapters", type=int, help="adapters of the 64-adapter runs (small: 6)")
    p.add_argument("--ranks", help="ranks cycled over them (8,16,32,64; small: 2,4)")
    p.add_argument("--many", type=int, help="adapters registered in the big run (1000; small 40)")
    p.add_argument("--many-ranks", help="their ranks, cycled (8,16; small: 2,4)")
    p.add_argument("--many-files", type=int, help="distinct folders behind them (64; small: 4)")
    p.add_argument("--max-loaded-loras", type=int, help="host copies in the big run (128; small 8)")
    p.add_argument("--zipf-alpha", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-flags", default="{}", help="server settings for every engine, JSON "
                   '(e.g. {"disable_overlap_schedule": true})')  # fmt: skip
    p.add_argument("--lora-hot-rows", type=int, help="the runner's hot A rows (its rule; 0: off)")
    p.add_argument("--skip", default="", help="comma list of runs to skip: many64, cap8, many1000")
    args = p.parse_args(argv)
    small = args.small
    pick = lambda value, big, tiny: value if value is not None else (tiny if small else big)  # noqa: E731
    args.requests = pick(args.requests, 256, 16)
    args.concurrency = pick(args.concurrency, 64, 8)
    args.prompt_len = pick(args.prompt_len, 128, 8)
    args.new_tokens = pick(args.new_tokens, 128, 4)
    args.num_adapters = pick(args.num_adapters, 64, 6)
    try:
        args.ranks = parse_ranks(pick(args.ranks, "8,16,32,64", "2,4"))
        args.many_ranks = parse_ranks(pick(args.many_ranks, "8,16", "2,4"))
    except ValueError as exc:
        p.error(str(exc))
    args.many = pick(args.many, 1000, 40)
    args.many_files = min(pick(args.many_files, 64, 4), args.many)
    args.max_loaded_loras = pick(args.max_loaded_loras, 128, 8)
    try:
        args.engine_flags = json.loads(args.engine_flags)
    except ValueError as exc:
        p.error(f"--engine-flags: {exc}")
    if not isinstance(args.engine_flags, dict):
        p.error("--engine-flags: a JSON object of server settings")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.out = (args.out or default_out()).resolve()  # a scratch path unless told
    for name in ("requests", "concurrency", "prompt_len", "new_tokens", "num_adapters", "many"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def parse_ranks(spec: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks {spec!r}: a comma list of positive integers")
    return ranks


# ----------------------------------------------------------------------------- workload


def cycled(values: Sequence[int], num: int) -> list[int]:
    return [values[i % len(values)] for i in range(num)]


def zipf_weights(num: int, alpha: float) -> list[float]:
    """P(k-th most popular) proportional to 1 / k**alpha, k = 1..num."""
    raw = [1.0 / (k**alpha) for k in range(1, num + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def choose_adapters(
    num_requests: int, names: Sequence[str], popularity: str, alpha: float, seed: int
) -> list[str]:
    """Each request's adapter: `zipf` (names[0] the most popular) or `uniform`."""
    rng = random.Random(seed)
    if popularity == "uniform":
        return [rng.choice(names) for _ in range(num_requests)]
    if popularity != "zipf":
        raise ValueError(f"popularity {popularity!r}: zipf or uniform")
    return rng.choices(list(names), weights=zipf_weights(len(names), alpha), k=num_requests)


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(10, vocab - 10) for _ in range(length)) for _ in range(num)]


# ----------------------------------------------------------------------------- results


class Record(NamedTuple):
    lora: str | None
    cold: bool  # its adapter held no GPU rows when it was submitted
    ttft_s: float
    tokens: int


class StepRecord(NamedTuple):
    is_decode: bool
    interval_s: float  # since the previous step returned: what the pipeline spent on this one
    floor_bytes: int  # decode steps: weights + KV read + the step's adapters at their rank
    num_adapters: int
    num_uploads: int = 0  # adapters the plan uploads into rows before its compute


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def summarize(records: Sequence[Record], steps: Sequence[StepRecord], wall_s: float,
              bandwidth: float | None) -> dict[str, Any]:  # fmt: skip
    tokens = sum(r.tokens for r in records)
    cold = [r.ttft_s for r in records if r.lora is not None and r.cold]
    warm = [r.ttft_s for r in records if r.lora is not None and not r.cold]
    decode = [s for s in steps if s.is_decode and s.interval_s > 0]
    out: dict[str, Any] = {
        "tok_s": round(tokens / wall_s, 1) if wall_s > 0 else None,
        "wall_s": round(wall_s, 3),
        "tokens": tokens,
        "ttft_p50_s": percentile([r.ttft_s for r in records], 0.5),
        "ttft_p50_cold_s": percentile(cold, 0.5),
        "ttft_p50_warm_s": percentile(warm, 0.5),
        "num_cold": len(cold),
        "num_warm": len(warm),
        "decode_steps": len(decode),
        "adapters_per_decode_step": (
            round(sum(s.num_adapters for s in decode) / len(decode), 1) if decode else None
        ),
        "decode_ms_p50": _ms(percentile([s.interval_s for s in decode], 0.5)),
        "other_steps": sum(not s.is_decode for s in steps),
        "other_steps_s": round(sum(s.interval_s for s in steps if not s.is_decode), 3),
        # what uploads cost shows apart: the steps that carried some, and their time
        "uploads": sum(s.num_uploads for s in steps),
        "upload_steps": sum(s.num_uploads > 0 for s in steps),
        "upload_steps_s": round(sum(s.interval_s for s in steps if s.num_uploads), 3),
    }
    if bandwidth and decode:
        floor_s = sum(s.floor_bytes for s in decode) / bandwidth
        out["decode_floor_fraction"] = round(floor_s / sum(s.interval_s for s in decode), 3)
    return out


def ratio(run: dict[str, Any] | None, base: dict[str, Any] | None, key: str = "tok_s") -> Any:
    if not run or not base or not run.get(key) or not base.get(key):
        return None
    return round(run[key] / base[key], 3)


def cold_ttft_ratio(run: dict[str, Any] | None) -> float | None:
    if not run or not run.get("ttft_p50_cold_s") or not run.get("ttft_p50_warm_s"):
        return None
    return round(run["ttft_p50_cold_s"] / run["ttft_p50_warm_s"], 3)


def headline(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's keys from the runs (None where a run is missing)."""
    return {
        "many_zipf64_vs_base": ratio(runs.get("zipf64"), runs.get("base64")),
        "many_uniform64_vs_base": ratio(runs.get("uniform64"), runs.get("base64")),
        "many_zipf64_cap8_vs_base": ratio(runs.get("zipf64_cap8"), runs.get("base_cap8")),
        "many_1000_vs_base": ratio(runs.get("zipf1000"), runs.get("base1000")),
        "many_cold_ttft_ratio": cold_ttft_ratio(runs.get("zipf1000")),
        "decode_floor_fraction": {
            name: run.get("decode_floor_fraction") for name, run in runs.items()
        },
    }


def write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import many_runs  # torch and the engine: only once arguments are fine

    data: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": os.environ.get("LORASRV_COMMIT", "unknown"),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "runs": {},
        "errors": {},
    }
    started = time.perf_counter()
    try:
        many_runs.run_all(args, data, lambda: write(args.out, data))
    except Exception as exc:  # keep what was measured
        traceback.print_exc()
        data["errors"]["main"] = f"{type(exc).__name__}: {exc}"
    data.update(headline(data["runs"]))
    data["total_s"] = round(time.perf_counter() - started, 1)
    write(args.out, data)
    print(json.dumps({k: v for k, v in data.items() if k.startswith("many_")}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not data["errors"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
