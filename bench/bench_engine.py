"""One run, one device: lorasrv's multi-LoRA cost, its distance from the HBM floor, and HF+PEFT.

Random Llama-3-8B-shaped bf16 weights are drawn on the GPU (no weight files). Sections, each in
its own try/except so one failure still leaves the other keys: copy bandwidth; decode step times
through ModelRunner.step (CUDA graphs on, and the same buckets eager); Engine generate, base vs
8 adapters; HF transformers + PEFT generate with the same 8-adapter mix; kernel GB/s.
Writes $TMPDIR/lorasrv-bench/latest.json, or `--out FILE` (the committed bench/results/ only when
named), and $OUT/latest.json when OUT is set.

GPU:  python bench/bench_engine.py            (well under 8 minutes on an H200)
CPU:  python bench/bench_engine.py --small    (tiny model, same code paths, under a minute)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_model as bm  # noqa: E402
import make_random_model as mrm  # noqa: E402

# NOTE: a scratch path, so a run never overwrites the committed bench/results/ unless asked to
DEFAULT_OUT = Path(tempfile.gettempdir()) / "lorasrv-bench" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--small", action="store_true", help="tiny model on CPU: tests the script")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--batch", type=int, help="requests per batch (64; small: 8)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens (128; small: 16)")
    p.add_argument("--new-tokens", type=int, help="generated tokens (128; small: 8)")
    p.add_argument("--peft-new-tokens", type=int, help="PEFT generated tokens (32; small: 4)")
    p.add_argument("--peft-repeats", type=int, default=2,
                   help="PEFT 8-adapter runs; the best counts (tok/s varies)")  # fmt: skip
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--skip", default="", help="comma list of sections to skip")
    p.add_argument("--lora-hot-rows", type=int, default=None,
                   help="runner's hot A cache rows (default: its cost rule; 0: off)")  # fmt: skip
    args = p.parse_args(argv)
    small = args.small
    args.batch = args.batch or (8 if small else 64)
    args.prompt_len = args.prompt_len or (16 if small else 128)
    args.new_tokens = args.new_tokens or (8 if small else 128)
    args.peft_new_tokens = args.peft_new_tokens or (4 if small else 32)
    args.device = torch.device("cpu" if small else "cuda")
    args.dtype = torch.float32 if small else torch.bfloat16
    args.shape = mrm.SHAPES["tiny" if small else "llama3-8b"]
    return args


class Results:
    """The JSON document; rewritten after every section so a crash keeps what was measured."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.data: dict[str, Any] = {"errors": {}, "section_s": {}}

    def section(self, name: str, fn: Callable[[], None], skip: set[str]) -> None:
        if name in skip:
            self.data["errors"][name] = "skipped (--skip)"
            return
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # one failing section must not lose the others
            traceback.print_exc()
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
        finally:
            self.data["section_s"][name] = round(time.perf_counter() - started, 1)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.write()

    def write(self) -> None:
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def commit() -> str:
    """The commit measured: LORASRV_COMMIT when set (a copied .git may be stale), else git."""
    if os.environ.get("LORASRV_COMMIT"):
        return os.environ["LORASRV_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, timeout=10,
                             capture_output=True, text=True, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=HERE, timeout=10, capture_output=True, text=True)  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LORASRV_COMMIT", "unknown")


def runner_kwargs(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    pages_per_seq = -(-(args.prompt_len + args.new_tokens + 1) // 16) + 1
    kv_pages = 2 * args.batch * pages_per_seq
    return {
        "device": str(args.device),
        "dtype": "float32" if args.small else "bfloat16",
        "page_size": 16,
        # the arena: that much KV and the adapters' rows
        "num_kv_pages": bm.arena_pages(args.model_dir, kv_pages, args.num_adapters, args.rank),
        # NOTE: the planner keeps one full context of KV pages for good (engine/arena.py); at
        # the shape's 131,072 tokens that floor would take this small arena's pages and leave
        # rows for one adapter at a time: the workload's longest sequence and a page instead
        "context_length": args.prompt_len + args.new_tokens + 16,
        "enable_lora": True,
        "lora_max_rank": args.rank,
        "lora_target_modules": ("all",),
        "enable_cuda_graph": True,
        "cuda_graph_max_batch_size": args.batch,
        "lora_hot_rows": args.lora_hot_rows,
        **(_interpreted_kernels() if args.small else {}),
        **extra,
    }


def _interpreted_kernels() -> dict[str, Any]:
    """--small under TRITON_INTERPRET=1: the CUDA code paths (kernels, static decode) on CPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return {}
    return {"attention_backend": "triton", "lora_backend": "triton"}


# ---------------------------------------------------------------------------- sections


def section_decode(args: argparse.Namespace, res: Results, model_dir: Path,
                   adapters: dict[str, Path]) -> None:  # fmt: skip
    """Decode step time through ModelRunner.step vs the HBM floor; graphs on and eager."""
    # NOTE: `step` waits for each step's tokens: the GPU time of one step, without overlap.
    kwargs = runner_kwargs(args)
    runner = bm.build_runner(model_dir, args.shape.std, **kwargs)
    placed = bm.load_adapters(runner, list(adapters.values()))
    context = args.prompt_len + args.new_tokens // 2  # the workload's mean decode position
    per_adapter = bm.adapter_bytes(runner, args.rank)
    bandwidth = res.data.get("copy_bandwidth_gbps")
    out: dict[str, Any] = {"context_len": context, "adapter_bytes": per_adapter,
                           "weight_bytes": bm.WEIGHT_STATS.get("decode_weight_bytes")}  # fmt: skip
    cases = {
        "bs1": (1, [-1]),
        "bs64_base": (args.batch, [-1] * args.batch),
        "bs64_n8": (args.batch, [i % args.num_adapters for i in range(args.batch)]),
    }
    modes = [("graph", True), ("eager", False)] if runner.decode is not None else [("eager", 0)]
    for name, (rows, slots) in cases.items():
        first, steady = bm.decode_plans(rows, context, slots, runner.page_size, placed)
        runner.step(first)
        for mode, use_graphs in modes:
            if runner.decode is not None:
                runner.decode.use_graphs = bool(use_graphs) and args.device.type == "cuda"
            warmup, iters = (1, 3) if args.small else (5, 30)
            seconds = bm.median_time_s(lambda p=steady: runner.step(p), args.device, warmup, iters)
            out[f"step_ms_{name}_{mode}"] = round(seconds * 1e3, 3)
        runner.step(bm.free_plan(rows))
        distinct = len({s for s in slots if s >= 0})
        floor_bytes = out["weight_bytes"] + bm.kv_bytes(runner, rows, context + 1)
        floor_bytes += distinct * per_adapter
        out[f"floor_bytes_{name}"] = floor_bytes
        if bandwidth:
            floor_s = floor_bytes / (bandwidth * 1e9)
            out[f"floor_ms_{name}"] = round(floor_s * 1e3, 3)
            best = out[f"step_ms_{name}_{modes[0][0]}"] / 1e3
            out[f"hbm_fraction_{name}"] = round(floor_s / best, 3)
    res.data["decode"] = out
    res.data["decode_hbm_fraction_bs1"] = out.get("hbm_fraction_bs1")
    res.data["decode_hbm_fraction_bs64_n8"] = out.get("hbm_fraction_bs64_n8")
    runner.shutdown()


async def _engine_runs(args: argparse.Namespace, model_dir: Path,
                       adapters: dict[str, Path]) -> dict[str, Any]:  # fmt: skip
    from lorasrv.config import build_config
    from lorasrv.engine.engine import Engine
    from lorasrv.engine.parts import prepare_parts
    from lorasrv.engine.requests import Submission
    from lorasrv.messages import SamplingParams

    config = build_config({
        "model_path": str(model_dir), "device": str(args.device),
        "dtype": "float32" if args.small else "bfloat16",
        "lora_paths": [f"{n}={p}" for n, p in adapters.items()],
        "max_loras_per_batch": args.num_adapters, "max_lora_rank": args.rank,
        "num_kv_pages": runner_kwargs(args)["num_kv_pages"],
        "max_running_requests": max(args.batch, 8),
    })  # fmt: skip
    parts = await prepare_parts(config)
    kwargs = runner_kwargs(args)
    parts = parts._replace(
        runner_factory=lambda: bm.build_runner(model_dir, args.shape.std, **kwargs)
    )
    gen = torch.Generator().manual_seed(0)
    vocab = args.shape.vocab
    prompts = torch.randint(10, vocab - 10, (args.batch, args.prompt_len), generator=gen).tolist()
    names = list(adapters)
    mixes = {"base": [None] * args.batch,
             "lora8": [names[i % len(names)] for i in range(args.batch)]}  # fmt: skip
    out: dict[str, Any] = {}
    async with Engine(config, parts=parts) as engine:
        for new_tokens in (4, args.new_tokens):  # warm-up (Triton, adapters into slots), then run
            for mix, loras in mixes.items():
                params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
                before = engine.last_stats
                started = time.perf_counter()
                handles = [
                    engine.submit(Submission(input_ids=tuple(p), lora_name=lora, params=params))
                    for p, lora in zip(prompts, loras, strict=True)
                ]
                results = await asyncio.gather(*(handle.result() for handle in handles))
                wall = time.perf_counter() - started
                out.update(_overlap_counts(mix, before, await _settled_stats(engine)))
                tokens = sum(r.completion_tokens for r in results)
                out[f"{mix}_tok_s"] = round(tokens / wall, 1)
                out[f"{mix}_wall_s"] = round(wall, 3)
                out[f"{mix}_tokens"] = tokens
    return out


async def _settled_stats(engine: Any) -> Any:
    """The scheduler's stats once it has published the batch's last step (it publishes after
    each inbox batch, so the last finish may come a moment before its snapshot)."""
    for _ in range(200):
        stats = engine.last_stats
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        await asyncio.sleep(0.005)
    return engine.last_stats


def _overlap_counts(mix: str, before: Any, after: Any) -> dict[str, int]:
    """The overlap schedule over one batch: steps run, of which planned while the previous one
    still ran (overlapped), and tokens sampled for rows that had finished (dropped)."""
    return {
        f"{mix}_steps": after.num_steps - before.num_steps,
        f"{mix}_steps_overlapped": after.num_steps_overlapped - before.num_steps_overlapped,
        f"{mix}_tokens_dropped": after.num_tokens_dropped - before.num_tokens_dropped,
    }


def section_engine(args: argparse.Namespace, res: Results, model_dir: Path,
                   adapters: dict[str, Path]) -> None:  # fmt: skip
    out = asyncio.run(_engine_runs(args, model_dir, adapters))
    res.data["engine"] = out
    res.data["lora_vs_base_throughput"] = round(out["lora8_tok_s"] / out["base_tok_s"], 3)


def section_peft(args: argparse.Namespace, res: Results) -> None:
    """The same 8-adapter mix through HF transformers + PEFT generate (random weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**mrm.model_config(args.shape, "bfloat16", None, []))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with args.device:
            base = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=list(mrm.ALL_MODULES),
                      lora_dropout=0.0, init_lora_weights=False)  # fmt: skip
    model = get_peft_model(base, lora, adapter_name="a0")
    for i in range(1, args.num_adapters):
        model.add_adapter(f"a{i}", lora)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, args.shape.vocab - 10, (args.batch, args.prompt_len), generator=gen)
    ids = ids.to(args.device)
    names = [f"a{i % args.num_adapters}" for i in range(args.batch)]
    out: dict[str, Any] = {"new_tokens": args.peft_new_tokens}

    def generate(new_tokens: int, adapter_names: list[str] | None) -> float:
        kwargs: dict[str, Any] = {"adapter_names": adapter_names} if adapter_names else {}
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0, eos_token_id=None, **kwargs)  # fmt: skip
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    generate(2, names)  # warm-up
    num_tokens = args.batch * args.peft_new_tokens
    # NOTE: PEFT's tok/s moved 117-166 between runs on one H200; its best run makes the ratio
    # the least favourable to lorasrv.
    runs = [num_tokens / generate(args.peft_new_tokens, names) for _ in range(args.peft_repeats)]
    out["lora8_tok_s_runs"] = [round(r, 1) for r in runs]
    out["lora8_tok_s"] = round(max(runs), 1)
    with model.disable_adapter():
        wall = generate(args.peft_new_tokens, None)
    out["base_tok_s"] = round(num_tokens / wall, 1)
    res.data["peft"] = out
    ours = res.data.get("engine", {}).get("lora8_tok_s")
    if ours:
        res.data["vs_peft_throughput"] = round(ours / out["lora8_tok_s"], 2)


def section_kernels(args: argparse.Namespace, res: Results) -> None:
    import bench_kernel_shapes

    bench_kernel_shapes.run(args.device, args.small, res.data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = [args.out] + (
        [Path(os.environ["OUT"]) / "latest.json"] if os.environ.get("OUT") else []
    )
    res = Results(paths)
    skip = set(filter(None, args.skip.split(",")))
    name = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu (--small)"
    res.data.update({
        "device": name, "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "small": args.small,
        "workload": {"batch": args.batch, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "num_adapters": args.num_adapters,
                     "rank": args.rank, "targets": "all seven", "shape": "tiny" if args.small
                     else "llama3-8b", "lora_hot_rows": args.lora_hot_rows},
    })  # fmt: skip
    if args.device.type == "cuda" and "triton" not in skip:
        import triton

        res.data["triton"] = triton.__version__
    scratch = bm.scratch_dir()
    model_dir, adapters = scratch / "model", {}
    args.model_dir = model_dir
    try:

        def setup() -> None:
            nonlocal adapters
            started = time.perf_counter()
            bm.write_model_dir(model_dir, args.shape, "float32" if args.small else "bfloat16")
            adapters = bm.write_adapters(scratch / "adapters", model_dir, args.shape,
                                         args.num_adapters, args.rank, args.device)  # fmt: skip
            res.data["adapter_write_s"] = round(time.perf_counter() - started, 2)

        def bandwidth() -> None:
            size = (64 << 20) if args.small else (2 << 30)
            res.data["copy_bandwidth_gbps"] = round(bm.copy_bandwidth(args.device, size) / 1e9, 1)

        res.section("setup", setup, skip)
        res.section("bandwidth", bandwidth, skip)
        res.section("decode", lambda: section_decode(args, res, model_dir, adapters), skip)
        res.section("engine", lambda: section_engine(args, res, model_dir, adapters), skip)
        res.section("peft", lambda: section_peft(args, res), skip)
        res.section("kernels", lambda: section_kernels(args, res), skip)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        res.write()
    summary(res.data)
    return 0


def summary(data: dict[str, Any]) -> None:
    keys = ["device", "commit", "copy_bandwidth_gbps", "lora_vs_base_throughput",
            "vs_peft_throughput", "decode_hbm_fraction_bs1",
            "decode_hbm_fraction_bs64_n8"]  # fmt: skip
    print("\n== summary")
    for key in keys:
        print(f"{key:<30} {data.get(key)}")
    for group in ("engine", "peft", "decode"):
        for key, value in data.get(group, {}).items():
            print(f"{group + '.' + key:<30} {value}")
    for key, value in data.get("kernels_summary", {}).items():
        print(f"{'kernels.' + key:<30} {value}")
    for key, value in data["errors"].items():
        print(f"ERROR {key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
