"""The device side of bench_many.py: engines over a random-weight runner, adapter folders, the
client at fixed concurrency, and the step clock that times every runner step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import shutil
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import bench_many as bmany
import bench_model as bm
import make_random_model as mrm
import torch

from lorasrv.config import build_config
from lorasrv.engine.engine import Engine
from lorasrv.engine.parts import prepare_parts
from lorasrv.engine.requests import Submission
from lorasrv.messages import SamplingParams, StepPlan
from lorasrv.model import runner as model_runner


class StepClock:
    """Wraps a runner's `launch`: each step's interval between its tokens reaching the host and
    the previous step's (steps finish in launch order; with two in flight this is the GPU's time
    per step), and for decode steps the bytes they must read at least (weights, KV, adapters at
    their rank)."""

    def __init__(self, runner: Any, weight_bytes: int) -> None:
        self.records: list[bmany.StepRecord] = []
        ready = runner.ready()
        arch = runner.arch
        element = runner.arena.geometry.element_size
        self.kv_token_bytes = arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * element
        self.row_bytes = ready.lora_row_bytes
        self.weight_bytes = weight_bytes
        self.last_s = time.perf_counter()
        launch = runner.launch
        clock = self

        class Timed:
            def __init__(self, plan: StepPlan, pending: Any) -> None:
                self.plan, self.pending, self.seen = plan, pending, False

            def result(self) -> Any:
                out = self.pending.result()
                if not self.seen and self.plan.seq_ids:
                    clock.add(self.plan)
                self.seen = True
                return out

        runner.launch = lambda plan: Timed(plan, launch(plan))

    def add(self, plan: StepPlan) -> None:
        now = time.perf_counter()
        kv = self.kv_token_bytes * sum(plan.context_lens) + sum(plan.query_lens)
        lora = self.row_bytes * sum(len(a.rows) for a in plan.adapters)
        self.records.append(bmany.StepRecord(
            plan.is_decode, now - self.last_s, self.weight_bytes + kv + lora, len(plan.adapters),
            len(plan.uploads),
        ))  # fmt: skip
        self.last_s = now


def write_adapters(root: Path, base: Path, shape: mrm.Shape, ranks: list[int],
                   targets: tuple[str, ...], device: torch.device) -> list[Path]:  # fmt: skip
    generator = torch.Generator(device=device).manual_seed(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folders = []
    for i, rank in enumerate(ranks):
        folder = root / f"f{i}"
        mrm.write_adapter(folder, shape, base_path=str(base), rank=rank, targets=targets,
                          dtype=dtype, generator=generator)  # fmt: skip
        folders.append(folder)
    return folders


async def client(
    engine: Engine,
    prompts: list[tuple[int, ...]],
    loras: list[str | None],
    args: argparse.Namespace,
    ids: dict[str, int],
) -> tuple[list[bmany.Record], float]:
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    gate = asyncio.Semaphore(args.concurrency)

    async def one(prompt: tuple[int, ...], lora: str | None) -> bmany.Record:
        async with gate:
            resident = {g.adapter_id for g in engine.last_stats.gpu_adapters if g.num_rows}
            cold = lora is not None and ids[lora] not in resident
            start = time.perf_counter()
            first, tokens = 0.0, 0
            async for out in engine.submit(Submission(input_ids=prompt, lora_name=lora,
                                                      params=params)):  # fmt: skip
                if out.token_ids and not tokens:
                    first = time.perf_counter() - start
                tokens += len(out.token_ids)
            return bmany.Record(lora, cold, first, tokens)

    started = time.perf_counter()
    records = await asyncio.gather(*(one(p, lora) for p, lora in zip(prompts, loras, strict=True)))
    return list(records), time.perf_counter() - started


async def engine_runs(args: argparse.Namespace, data: dict[str, Any], model_dir: Path,
                      names: dict[str, Path], runs: dict[str, str], flags: dict[str, Any],
                      save: Callable[[], None]) -> None:  # fmt: skip
    """One engine, adapters registered concurrently; each run in `runs` (name -> popularity,
    or "base") over `names`; results into data["runs"]."""
    config = build_config({
        "model_path": str(model_dir), "device": str(args.device),
        "dtype": "float32" if args.small else "bfloat16", "enable_lora": True, **flags,
        **args.engine_flags,
    })  # fmt: skip
    parts = await prepare_parts(config)
    clocks: list[StepClock] = []
    real_factory = parts.runner_factory  # the server's own, flags and all

    def build() -> Any:
        with bm.random_base_weights(args.shape.std), hot_rows(args.lora_hot_rows):
            runner = real_factory()  # weights drawn on the device, no files
        clocks.append(StepClock(runner, bm.WEIGHT_STATS["decode_weight_bytes"]))
        return runner

    parts = parts._replace(runner_factory=build)
    async with Engine(config, parts=parts) as engine:
        started = time.perf_counter()
        done = await asyncio.gather(*(engine.load_adapter(n, str(p)) for n, p in names.items()))
        failed = [d.error_message for d in done if not d.success]
        assert not failed, failed[:3]
        ids = {a.name: int(a.adapter_id) for a in await engine.describe_adapters()}
        data.setdefault("register_s", {})[",".join(runs)] = round(time.perf_counter() - started, 1)
        prompts = bmany.make_prompts(args.requests, args.prompt_len, args.shape.vocab, args.seed)
        warm = list(names)[: args.concurrency]
        await client(engine, prompts[: len(warm)], list(warm), _short(args), ids)  # warm-up
        for run, popularity in runs.items():
            loras: list[str | None] = [None] * args.requests
            if popularity != "base":
                loras = list(bmany.choose_adapters(args.requests, list(names), popularity,
                                                   args.zipf_alpha, args.seed + 1))  # fmt: skip
            first_step = len(clocks[-1].records)
            records, wall = await client(engine, prompts, loras, args, ids)
            steps = clocks[-1].records[first_step:]
            data["runs"][run] = bmany.summarize(records, steps, wall, data.get("bandwidth"))
            print(run, data["runs"][run], flush=True)
            save()


@contextlib.contextmanager
def hot_rows(rows: int | None) -> Iterator[None]:
    """The runner's hot A rows for the runners built inside (a runner option no flag sets)."""
    if rows is None:
        yield
        return
    make = functools.partial(model_runner.ModelRunner, lora_hot_rows=rows)
    with mock.patch.object(model_runner, "ModelRunner", make):
        yield


def _short(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "new_tokens": 2})


def section(data: dict[str, Any], name: str, fn: Callable[[], Coroutine[Any, Any, None]],
            args: argparse.Namespace, save: Callable[[], None]) -> None:  # fmt: skip
    if name in args.skip:
        data.setdefault("skipped", []).append(name)  # asked for: not an error
        return
    started = time.perf_counter()
    try:
        asyncio.run(fn())
    except Exception as exc:  # one failing engine must not lose the others
        traceback.print_exc()
        data["errors"][name] = f"{type(exc).__name__}: {exc}"
    finally:
        data.setdefault("section_s", {})[name] = round(time.perf_counter() - started, 1)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        save()


def run_all(args: argparse.Namespace, data: dict[str, Any], save: Callable[[], None]) -> None:
    args.device = torch.device("cpu" if args.small else "cuda")
    args.shape = mrm.SHAPES["tiny" if args.small else "llama3-8b"]
    data["device"] = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    scratch = bm.scratch_dir()
    try:
        model_dir = scratch / "model"
        bm.write_model_dir(model_dir, args.shape, "float32" if args.small else "bfloat16")
        size = (64 << 20) if args.small else (2 << 30)
        data["bandwidth"] = bm.copy_bandwidth(args.device, size)  # bytes/s, read + write
        ranks = bmany.cycled(args.ranks, args.num_adapters)
        folders = write_adapters(scratch / "a64", model_dir, args.shape, ranks, mrm.ALL_MODULES,
                                 args.device)  # fmt: skip
        names = {f"a{i}": folder for i, folder in enumerate(folders)}
        flags = {"max_lora_rank": max(args.ranks), "lora_target_modules": ["all"]}
        section(data, "many64", lambda: engine_runs(
            args, data, model_dir, names,
            {"base64": "base", "zipf64": "zipf", "uniform64": "uniform"}, flags, save,
        ), args, save)  # fmt: skip
        section(data, "cap8", lambda: engine_runs(
            args, data, model_dir, names, {"base_cap8": "base", "zipf64_cap8": "zipf"},
            {**flags, "max_loras_per_batch": 8}, save,
        ), args, save)  # fmt: skip
        shutil.rmtree(scratch / "a64", ignore_errors=True)
        many_ranks = bmany.cycled(args.many_ranks, args.many_files)
        files = write_adapters(scratch / "a1000", model_dir, args.shape, many_ranks, ATTN_MODULES,
                               args.device)  # fmt: skip
        # NOTE: 1,000 names over fewer folders: every name is its own adapter version (own id,
        # host copy, GPU rows, uploads); only the bytes on disk repeat.
        many = {f"m{i}": files[i % len(files)] for i in range(args.many)}
        many_flags = {
            "max_lora_rank": max(args.many_ranks),
            "lora_target_modules": list(ATTN_MODULES),
            "max_loaded_loras": args.max_loaded_loras,
        }
        section(data, "many1000", lambda: engine_runs(
            args, data, model_dir, many, {"base1000": "base", "zipf1000": "zipf"}, many_flags,
            save,
        ), args, save)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


ATTN_MODULES = bmany.ATTN
