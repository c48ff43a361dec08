"""Tensor parallelism: --tp-size 2 against --tp-size 1 on one random model, in one run.

    python bench/tp_check.py            # 2 GPUs: random Llama-3-8B-shaped bf16, CUDA graphs
    python bench/tp_check.py --eager    # the same without CUDA graphs
    python bench/tp_check.py --small    # CPU: tiny float32 model, gloo between ranks, ~1-2 min

Builds (or reuses) a random checkpoint with 8 rank-16 adapters on every module
(make_random_model.py), then runs each mode of `--tp-sizes` in its own child process through the
library Engine: greedy prompts with base rows and the 8 adapters' rows mixed in one batch (the
first mode, the reference, runs them twice: the second time submitted in another order, so
batches differ), then decode throughput at batch 1, 16 and 64, base rows and rows over the 8
adapters. Prints and writes to `--out` (default $TMPDIR/lorasrv-bench/tp_check.json, never
bench/results/latest.json) every figure: `tp2_vs_tp1_decode_bs64` (throughput ratio),
`tp2_vs_tp1_itl_bs1` (step time ratio) and the other batches and kinds, token agreement of tp 2
and of the reordered tp 1 run against tp 1, and the issue's targets (tp_check_figures.py).

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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp_check_figures import report_lines, summarize  # noqa: E402

NUM_ADAPTERS = 8


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
    parser.add_argument("--small", action="store_true", help="tiny model on CPU: tests the script")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs in any mode")
    parser.add_argument("--shape", help="make_random_model.py shape (llama3-8b; small: tiny)")
    parser.add_argument("--num-layers", type=int, help="override the shape's layer count")
    parser.add_argument("--model-dir", type=Path, help="default /tmp/lorasrv-bench/<shape>-random")
    parser.add_argument("--tp-sizes", default="1,2", help="modes to run, first = reference")
    parser.add_argument("--num-prompts", type=int, help="compared prompts (48; small: 9)")
    parser.add_argument("--input-len", type=int, default=48)
    parser.add_argument("--output-len", type=int, help="tokens compared per prompt (48; small: 8)")
    parser.add_argument("--decode-batches", default="1,16,64")
    parser.add_argument("--decode-len", type=int, help="tokens per decode request (128; small: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-timeout-s", type=float, default=900)
    parser.add_argument("--min-first-match", type=float, default=0.75)
    parser.add_argument("--out", type=Path, help="default $TMPDIR/lorasrv-bench/tp_check.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: run one mode
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reorder", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    small = args.small
    args.shape = args.shape or ("tiny" if small else "llama3-8b")
    args.device, args.dtype = ("cpu", "float32") if small else ("cuda", "bfloat16")
    args.num_prompts = args.num_prompts or (9 if small else 48)
    args.output_len = args.output_len or (8 if small else 48)
    args.decode_len = args.decode_len or (8 if small else 128)
    args.out = args.out or Path(tempfile.gettempdir()) / "lorasrv-bench" / "tp_check.json"
    return args


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
    results = {
        tp_size: run_mode(args, model_dir, tp_size, tp_size == modes[0]) for tp_size in modes
    }
    summary = summarize(results, modes)
    print("\n" + "\n".join(report_lines(results, modes, summary)))
    ok = all("error" not in r for r in results.values())
    for key, value in summary.items():
        if key.startswith(f"tp{modes[0]}_vs") or not key.endswith("_agreement"):
            continue
        if value["first_token_match"] < args.min_first_match:
            print(f"FAIL: {key}: first-token agreement below {args.min_first_match:.0%}")
            ok = False
    report = {"args": _jsonable(vars(args)), **summary, "ok": ok, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}\nRESULT: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


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


def run_mode(
    args: argparse.Namespace, model_dir: Path, tp_size: int, is_reference: bool
) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="tp-check.")) / f"tp{tp_size}.json"
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    command += ["--model-dir", str(model_dir), "--child", str(tp_size), "--child-out", str(out)]
    if is_reference:
        command.append("--reorder")
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
    state = "FAILED: " + result["error"] if "error" in result else "ok"
    print(f"   tp {tp_size}: {state} in {elapsed:.0f}s", flush=True)
    return result


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


def engine_config(args: argparse.Namespace, names: list[str]) -> Any:
    from lorasrv.config import build_config

    adapters = args.model_dir.with_name(args.model_dir.name + "-adapters")
    options: dict[str, Any] = {
        "model_path": str(args.model_dir),
        "device": args.device,
        "dtype": args.dtype,
        "tp_size": args.child,
        "lora_paths": [f"{n}={adapters / n}" for n in names],
        "max_lora_rank": 16,
        "context_length": 1024 if args.small else 4096,
        "disable_cuda_graph": args.eager,
        "max_running_requests": 256,
        "chunked_prefill_size": 2048 if args.small else 8192,
        "port": 0,
        "log_level": "warning",
    }
    if args.small:
        options["num_kv_pages"] = 2048  # CPU: no device memory to size the arena from
    return build_config(options)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from lorasrv.engine.engine import Engine

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    names = [f"a{i}" for i in range(NUM_ADAPTERS)]
    started = time.perf_counter()
    async with Engine(engine_config(args, names)) as engine:
        startup_s = time.perf_counter() - started
        vocab = engine.ready_info.vocab_size
        rng = random.Random(args.seed)
        loras: list[str | None] = [None, *names]
        # Warm-up (kernel compiles), then the compared prompts: rows of every kind in a batch.
        await greedy(engine, [prompt(rng, vocab, 16) for _ in loras], loras, 4)
        prompts = [prompt(rng, vocab, args.input_len) for _ in range(args.num_prompts)]
        rows = [loras[i % len(loras)] for i in range(args.num_prompts)]
        outputs = await greedy(engine, prompts, rows, args.output_len)
        reordered = None
        if args.reorder:  # the same prompts submitted in another order: other batches
            order = list(range(len(prompts)))
            random.Random(args.seed + 1).shuffle(order)
            shuffled = await greedy(
                engine, [prompts[i] for i in order], [rows[i] for i in order], args.output_len
            )
            reordered = [shuffled[order.index(i)] for i in range(len(prompts))]
        decode = []
        for kind in ("base", f"lora{NUM_ADAPTERS}"):
            for batch in (int(b) for b in args.decode_batches.split(",")):
                batch_prompts = [prompt(rng, vocab, 32) for _ in range(batch)]
                adapters = [None if kind == "base" else names[i % len(names)] for i in range(batch)]
                rate = await decode_rate(engine, batch_prompts, adapters, args.decode_len)
                decode.append({"kind": kind, **rate})
        device = engine.ready_info.device
    return {
        "tp_size": args.child,
        "device": _device_name(device),
        "startup_s": startup_s,
        "outputs": [{"lora": r, "output_ids": o} for r, o in zip(rows, outputs, strict=True)],
        "outputs_reordered": None
        if reordered is None
        else [{"lora": r, "output_ids": o} for r, o in zip(rows, reordered, strict=True)],
        "decode": decode,
    }


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"cpu ({os.cpu_count()} cores)"


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


async def decode_rate(
    engine: Any, prompts: list[list[int]], loras: list[str | None], num_new: int
) -> dict[str, Any]:
    """All requests start together (one prefill step), so after the last first token every
    step is a decode step of the whole batch: tokens after it / time after it."""
    from lorasrv.engine.requests import Submission
    from lorasrv.messages import SamplingParams

    params = SamplingParams(max_new_tokens=num_new, temperature=0, ignore_eos=True)

    async def one(ids: list[int], lora: str | None) -> tuple[float, float, int]:
        first, count = 0.0, 0
        submission = Submission(input_ids=tuple(ids), lora_name=lora, params=params)
        async for out in engine.submit(submission):
            count += len(out.token_ids)
            if not first and count:
                first = time.perf_counter()
        return first, time.perf_counter(), count

    runs = await asyncio.gather(*(one(p, a) for p, a in zip(prompts, loras, strict=True)))
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
