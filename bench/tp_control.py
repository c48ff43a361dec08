"""The tensor-parallel control path alone: what one step costs the coordinator and the workers
besides the model's work, on CPU.

Starts `TpRunner` with `--tp-size` worker processes that run `NullRunner` (no weights, no device,
no collectives: each answers one token per sampled row), then times `TpRunner.step` on decode
plans shaped like a server's (batch 1, 16, 64; `--context` tokens per row in pages of 16; half
the rows on 8 adapters). The time per step is the control path's round trip: the coordinator
sending the plan, every worker receiving and decoding it, rank 0's result coming back. Also
times the plan codec alone in this process (what the coordinator and each worker spend on it).

    PYTHONPATH=$PWD:$PWD/kernels python bench/tp_control.py             # ~10 s on CPU
    PYTHONPATH=$PWD:$PWD/kernels python bench/tp_control.py --out /tmp/tp_control.json

Prints one line per batch size (mean, p50, p90 microseconds per step) and writes them to `--out`
(a scratch path by default; never bench/results/latest.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGE_SIZE = 16
NUM_ADAPTERS = 8
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "eos_token_id": 2,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp-size", type=int, default=2)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--context", type=int, default=1024, help="tokens per row")
    parser.add_argument("--steps", type=int, default=400, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--out", type=Path, help="default: a file under /tmp")
    return parser.parse_args(argv)


def decode_plans(batch: int, context: int, num_steps: int) -> list[Any]:
    """`num_steps` decode steps of `batch` rows from about `context` tokens each, built as the
    engine builds them (each row's pages a list of ints, a new page when its context crosses a
    page boundary, `tuple(blocks)` per plan); half the rows on 8 adapters."""
    from lorasrv.ids import AdapterId, SeqId, StepId
    from lorasrv.messages import AdapterRows, StepPlan

    num_base = batch // 2
    lora = [-1] * num_base + sorted(i % NUM_ADAPTERS for i in range(batch - num_base))
    used = sorted({i for i in lora if i >= 0})
    adapters = tuple(
        AdapterRows(AdapterId(100 + i), tuple(range(5000 + 16 * i, 5016 + 16 * i))) for i in used
    )
    index = {a: n for n, a in enumerate(used)}
    contexts = [context + r for r in range(batch)]  # rows cross page boundaries apart
    blocks = [list(range(r * 1000, r * 1000 + c // PAGE_SIZE + 1)) for r, c in enumerate(contexts)]
    plans = []
    for step in range(num_steps):
        plans.append(
            StepPlan(
                step_id=StepId(step),
                seq_ids=tuple(SeqId(1_000_000 + r) for r in range(batch)),
                input_ids=tuple(1000 + 7 * r + step for r in range(batch)),
                query_lens=(1,) * batch,
                context_lens=tuple(contexts),
                block_tables=tuple(tuple(b) for b in blocks),
                lora_adapters=tuple(index[i] if i >= 0 else -1 for i in lora),
                adapters=adapters,
                sample_rows=(True,) * batch,
            )
        )
        for r in range(batch):
            contexts[r] += 1
            if contexts[r] // PAGE_SIZE >= len(blocks[r]):
                blocks[r].append(blocks[r][-1] + 1)
    return plans


def time_codec(plans: list[Any]) -> tuple[float, float]:
    """Microseconds to encode a plan (the coordinator) and to decode it (each worker), steady
    state (tables already sent once)."""
    from lorasrv.tp.plan_codec import PlanDecoder, PlanEncoder

    encoder, decoder = PlanEncoder(), PlanDecoder()
    buffers, encode_s, decode_s = [], 0.0, 0.0
    for plan in plans:
        started = time.perf_counter()
        words, tail = encoder.encode(plan)
        encode_s += time.perf_counter() - started
        buffers.append(words.tobytes() + tail)
    for data in buffers:
        started = time.perf_counter()
        decoder.decode(data)
        decode_s += time.perf_counter() - started
    return 1e6 * encode_s / len(plans), 1e6 * decode_s / len(plans)


def time_batch(runner: Any, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    from lorasrv.tp.null_runner import expected_tokens

    plans = decode_plans(batch, args.context, args.warmup + args.steps)
    encode_us, decode_us = time_codec(plans) if _has_codec() else (None, None)
    times = []
    for n, plan in enumerate(plans):
        started = time.perf_counter()
        result = runner.step(plan)
        elapsed = time.perf_counter() - started
        if result.token_ids != expected_tokens(plan):
            raise AssertionError(f"batch {batch}, step {n}: the plan did not arrive whole")
        if n >= args.warmup:
            times.append(elapsed * 1e6)
    times.sort()
    return {
        "batch": batch,
        "context": args.context,
        "steps": len(times),
        "mean_us": statistics.fmean(times),
        "p50_us": times[len(times) // 2],
        "p90_us": times[int(len(times) * 0.9)],
        "encode_us": encode_us,
        "decode_us": decode_us,
    }


def _has_codec() -> bool:
    import importlib.util

    return importlib.util.find_spec("lorasrv.tp.plan_codec") is not None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from lorasrv.tp.null_runner import NULL_RUNNER
    from lorasrv.tp.runner import TpRunner

    model_dir = Path(tempfile.mkdtemp(prefix="tp-control."))
    (model_dir / "config.json").write_text(json.dumps(TINY_CONFIG))
    runner = TpRunner(
        tp_size=args.tp_size,
        model_path=str(model_dir),
        device="cpu",
        runner_class=NULL_RUNNER,
        page_size=PAGE_SIZE,
    )
    try:
        rows = [time_batch(runner, int(b), args) for b in args.batches.split(",")]
    finally:
        runner.shutdown()
    print(f"tp {args.tp_size}, NullRunner workers, {args.context}-token rows, {args.steps} steps")
    for row in rows:
        codec = ""
        if row["encode_us"] is not None:
            codec = f"  (plan encode {row['encode_us']:.1f} us, decode {row['decode_us']:.1f} us)"
        print(
            f"  bs {row['batch']:>4}: mean {row['mean_us']:8.1f} us  p50 {row['p50_us']:8.1f} us"
            f"  p90 {row['p90_us']:8.1f} us per step{codec}"
        )
    out = args.out or Path(tempfile.gettempdir()) / "lorasrv-tp-control.json"
    out.write_text(json.dumps({"args": {**vars(args), "out": str(out)}, "steps": rows}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
