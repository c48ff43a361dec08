"""Tensor parallelism on the GPU: --tp-size 2 against --tp-size 1 on one random model.

Builds (or reuses) a random Llama-3-8B-shaped bf16 checkpoint with two rank-16 adapters
(bench/make_random_model.py, weights drawn on the GPU), then runs each mode in a child process
through the library Engine: the same greedy prompts (base and adapter rows mixed in one batch)
and decode-throughput batches. Prints token agreement and decode throughput side by side.

    python bench/tp_check.py                      # 2 GPUs, about 4-5 minutes with the model build
    python bench/tp_check.py --shape tiny --device cpu --dtype float32   # a CPU smoke run

Exit status: 0 when every mode ran and first tokens agree on at least --min-first-match of the
prompts (a sharding bug agrees on almost none), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NUM_ADAPTERS = 2


def prepare_environment() -> None:
    """A bare checkout works too: the repo first on the path, kernels/ as lorasrv_kernels;
    PYTHONPATH carries it to the child processes (and multiprocessing to the TP workers).
    NVLink multicast stays off (shared hosts): kept if set, set if not."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    paths = [str(ROOT)]
    if importlib.util.find_spec("lorasrv_kernels") is None:
        shim = Path(tempfile.mkdtemp(prefix="lorasrv-pypath."))
        (shim / "lorasrv_kernels").symlink_to(ROOT / "kernels")
        paths.append(str(shim))
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("PYTHONUNBUFFERED", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", help="make_random_model.py shape")
    parser.add_argument("--num-layers", type=int, help="override the shape's layer count")
    parser.add_argument("--model-dir", type=Path, help="default /tmp/lorasrv-bench/<shape>-random")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tp-sizes", default="1,2", help="modes to run, first = reference")
    parser.add_argument("--cuda-graph", action="store_true", help="(default: eager in all modes)")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=48)
    parser.add_argument("--output-len", type=int, default=48, help="tokens compared per prompt")
    parser.add_argument("--decode-batches", default="1,16,64")
    parser.add_argument("--decode-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-timeout-s", type=float, default=300)
    parser.add_argument("--min-first-match", type=float, default=0.75)
    parser.add_argument("--json", type=Path, help="write every figure here too")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: run one mode
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_environment()
    if args.child is not None:
        return run_child(args)
    model_dir = args.model_dir or Path(f"/tmp/lorasrv-bench/{args.shape}-random")
    if not build_model(args, model_dir):
        return 1
    modes = [int(t) for t in args.tp_sizes.split(",")]
    results: dict[int, dict[str, Any]] = {}
    for tp_size in modes:
        results[tp_size] = run_mode(args, model_dir, tp_size)
    report = summarize(args, results, modes)
    if args.json:
        args.json.write_text(json.dumps({"args": _jsonable(vars(args)), **report}, indent=2))
    return 0 if report["ok"] else 1


def build_model(args: argparse.Namespace, model_dir: Path) -> bool:
    adapters = model_dir.with_name(model_dir.name + "-adapters")
    last = adapters / f"a{NUM_ADAPTERS - 1}" / "adapter_config.json"
    if (model_dir / "config.json").is_file() and last.is_file():
        print(f"== model: reusing {model_dir}", flush=True)
        return True
    command = [
        sys.executable, str(ROOT / "bench" / "make_random_model.py"), "--shape", args.shape,
        "--output", str(model_dir), "--device", args.device, "--dtype", args.dtype,
        "--num-adapters", str(NUM_ADAPTERS), "--adapter-rank", "16", "--adapter-targets", "all",
        "--seed", str(args.seed),
    ]  # fmt: skip
    if args.num_layers:
        command += ["--num-layers", str(args.num_layers)]
    print(f"== model: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, check=False, timeout=900)
    print(f"   built in {time.perf_counter() - started:.0f}s (status {done.returncode})")
    return done.returncode == 0


def run_mode(args: argparse.Namespace, model_dir: Path, tp_size: int) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="tp-check.")) / f"tp{tp_size}.json"
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    command += ["--model-dir", str(model_dir), "--child", str(tp_size), "--child-out", str(out)]
    print(f"== tp {tp_size}: running", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, check=False, timeout=args.child_timeout_s)
        status: object = done.returncode
    except subprocess.TimeoutExpired:
        status = f"timed out after {args.child_timeout_s:.0f}s"
    elapsed = time.perf_counter() - started
    if out.is_file():
        result: dict[str, Any] = json.loads(out.read_text())
    else:
        result = {"error": f"child exited ({status}) without results; see its log above"}
    result["wall_s"] = elapsed
    print(f"   tp {tp_size}: {'FAILED: ' + result['error'] if 'error' in result else 'ok'} "
          f"in {elapsed:.0f}s", flush=True)  # fmt: skip
    return result


def summarize(
    args: argparse.Namespace, results: dict[int, dict[str, Any]], modes: list[int]
) -> dict[str, Any]:
    print("\n== decode throughput (output tokens/s after the first token; eager unless "
          f"--cuda-graph; {args.decode_len} tokens per request)")  # fmt: skip
    print(f"{'mode':<6}{'startup s':>10}" + "".join(f"{f'bs {b}':>12}" for b in _batches(args)))
    for tp_size in modes:
        r = results[tp_size]
        if "error" in r:
            print(f"tp{tp_size:<4} FAILED: {r['error']}")
            continue
        rates = "".join(f"{d['tokens_per_s']:>12.1f}" for d in r["decode"])
        print(f"tp{tp_size:<4}{r['startup_s']:>10.1f}{rates}")
    reference, ok = results[modes[0]], all("error" not in r for r in results.values())
    report: dict[str, Any] = {"results": {str(k): v for k, v in results.items()}, "compare": {}}
    for tp_size in modes[1:]:
        r = results[tp_size]
        if "error" in r or "error" in reference:
            continue
        match = token_match(reference["outputs"], r["outputs"])
        speedups = [
            d["tokens_per_s"] / base["tokens_per_s"]
            for d, base in zip(r["decode"], reference["decode"], strict=True)
        ]
        match["decode_speedup"] = speedups
        report["compare"][f"tp{tp_size}_vs_tp{modes[0]}"] = match
        print(
            f"\n== tp{tp_size} vs tp{modes[0]} on {match['num_prompts']} prompts "
            f"(base and adapter rows mixed), {args.output_len} greedy tokens each, {args.dtype}"
        )
        print(f"first token equal:       {match['first_token_match']:.1%}")
        print(f"whole sequence equal:    {match['sequence_match']:.1%}")
        print(f"tokens before divergence {match['prefix_match']:.1%} of all positions")
        for kind, rate in match["first_token_match_by_lora"].items():
            print(f"  first token equal, {kind:<5} rows: {rate:.1%}")
        print("decode speedup: " + ", ".join(
            f"bs {b}: {s:.2f}x" for b, s in zip(_batches(args), speedups, strict=True)
        ))  # fmt: skip
        if match["first_token_match"] < args.min_first_match:
            print(f"FAIL: first-token agreement below {args.min_first_match:.0%}")
            ok = False
    print("\nNOTE: in bf16, sums in another order (sharded matmuls, all-reduces) move logits by")
    print("rounding noise, so later tokens drift where two candidates nearly tie; a sharding bug")
    print("shows up as disagreement from the first token on.")
    report["ok"] = ok
    print("\nRESULT:", "ok" if ok else "FAILED")
    return report


def token_match(reference: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    first = sequences = prefix = total = 0
    by_kind: dict[str, list[int]] = {}
    for a, b in zip(reference, other, strict=True):
        ids_a, ids_b = a["output_ids"], b["output_ids"]
        same_first = bool(ids_a) and bool(ids_b) and ids_a[0] == ids_b[0]
        first += same_first
        sequences += ids_a == ids_b
        n = 0
        while n < min(len(ids_a), len(ids_b)) and ids_a[n] == ids_b[n]:
            n += 1
        prefix += n
        total += len(ids_a)
        kind = "base" if a["lora"] is None else "lora"
        by_kind.setdefault(kind, []).append(int(same_first))
    count = len(reference)
    return {
        "num_prompts": count,
        "first_token_match": first / count,
        "sequence_match": sequences / count,
        "prefix_match": prefix / max(total, 1),
        "first_token_match_by_lora": {k: sum(v) / len(v) for k, v in by_kind.items()},
    }


def _batches(args: argparse.Namespace) -> list[int]:
    return [int(b) for b in args.decode_batches.split(",")]


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


# ----------------------------------------------------------------------------- child


def run_child(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(measure(args))
    except BaseException as exc:  # report, never hang the parent
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    args.child_out.write_text(json.dumps(result))
    return 0 if "error" not in result else 1


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from lorasrv.config import build_config
    from lorasrv.engine.engine import Engine

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    model_dir: Path = args.model_dir
    adapters = model_dir.with_name(model_dir.name + "-adapters")
    names = [f"a{i}" for i in range(NUM_ADAPTERS)]
    config = build_config(
        {
            "model_path": str(model_dir),
            "device": args.device,
            "dtype": args.dtype,
            "tp_size": args.child,
            "lora_paths": [f"{n}={adapters / n}" for n in names],
            "max_loras_per_batch": NUM_ADAPTERS + 1,
            "max_lora_rank": 16,
            "context_length": 4096,
            "disable_cuda_graph": not args.cuda_graph,
            "max_running_requests": 256,
            "chunked_prefill_size": 8192,
            "port": 0,
            "log_level": "warning",
        }
    )
    started = time.perf_counter()
    async with Engine(config) as engine:
        startup_s = time.perf_counter() - started
        vocab = engine.ready_info.vocab_size
        rng = random.Random(args.seed)
        loras: list[str | None] = [None, *names]
        # Warm-up (kernel compiles), then the compared prompts: rows of every kind in a batch.
        await greedy(engine, [prompt(rng, vocab, 16) for _ in range(6)], loras * 2, 8)
        prompts = [prompt(rng, vocab, args.input_len) for _ in range(args.num_prompts)]
        rows = [loras[i % len(loras)] for i in range(args.num_prompts)]
        outputs = await greedy(engine, prompts, rows, args.output_len)
        decode = []
        for batch in _batches(args):
            batch_prompts = [prompt(rng, vocab, 32) for _ in range(batch)]
            decode.append(await decode_rate(engine, batch_prompts, args.decode_len))
        ready = engine.ready_info
    return {
        "tp_size": args.child,
        "startup_s": startup_s,
        "num_kv_pages": ready.num_kv_pages,
        "device": ready.device,
        "outputs": [{"lora": r, "output_ids": o} for r, o in zip(rows, outputs, strict=True)],
        "decode": decode,
    }


def prompt(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [rng.randrange(10, vocab - 10) for _ in range(length)]


async def greedy(
    engine: Any, prompts: list[list[int]], loras: list[str | None], num_new: int
) -> list[list[int]]:
    from lorasrv.engine.requests import Submission
    from lorasrv.messages import SamplingParams

    params = SamplingParams(max_new_tokens=num_new, temperature=0, ignore_eos=True)
    handles = [
        engine.submit(Submission(input_ids=tuple(p), lora_name=lora, params=params))
        for p, lora in zip(prompts, loras, strict=False)
    ]
    results = await asyncio.gather(*(handle.result() for handle in handles))
    return [list(r.token_ids) for r in results]


async def decode_rate(engine: Any, prompts: list[list[int]], num_new: int) -> dict[str, Any]:
    """All requests start together (one prefill step), so after the last first token every
    step is a decode step of the whole batch: tokens after it / time after it."""
    from lorasrv.engine.requests import Submission
    from lorasrv.messages import SamplingParams

    params = SamplingParams(max_new_tokens=num_new, temperature=0, ignore_eos=True)

    async def one(ids: list[int]) -> tuple[float, float, int]:
        first, count = 0.0, 0
        async for out in engine.submit(Submission(input_ids=tuple(ids), params=params)):
            count += len(out.token_ids)
            if not first and count:
                first = time.perf_counter()
        return first, time.perf_counter(), count

    runs = await asyncio.gather(*(one(p) for p in prompts))
    t_first = max(r[0] for r in runs)
    t_end = max(r[1] for r in runs)
    tokens = sum(r[2] - 1 for r in runs)
    seconds = max(t_end - t_first, 1e-9)
    return {
        "batch": len(prompts),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "step_ms": 1000 * seconds / max(num_new - 1, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
