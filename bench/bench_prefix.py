"""Prefix caching per adapter: a multi-turn chat, the prefix cache on vs off, in one run.

Each adapter has its own system prompt (1,000 tokens), shared by its conversations (4 per
adapter, 8 adapters); each conversation runs 4 turns one after the other, all conversations at
once. Turn t's prompt is the system prompt, every earlier user turn and reply, then the new user
turn, so the cache can serve the system prompt (across conversations) and the history (across
turns). The same workload runs on two engines, one after the other: `disable_radix_cache` on,
then off (the default). Reported: TTFT p50 and output throughput of each, and
`prefix_cache_ttft_ratio` (on / off; target <= 0.4) and `prefix_cache_throughput_ratio`
(on / off; target >= 1.5). Random Llama-3-8B-shaped weights drawn on the GPU, as bench_engine.py.

GPU:  python bench/bench_prefix.py           (a few minutes on an H100)
CPU:  python bench/bench_prefix.py --small   (tiny model, float32: checks the script)
Writes $TMPDIR/lorasrv-bench/prefix.json, or `--out FILE`, and $OUT/prefix.json when OUT is set.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# NOTE: a scratch path, so a run never overwrites the committed bench/results/ unless asked to
DEFAULT_OUT = Path(tempfile.gettempdir()) / "lorasrv-bench" / "prefix.json"
TARGET_TTFT_RATIO = 0.4  # at most
TARGET_THROUGHPUT_RATIO = 1.5  # at least
MIN_TOKEN_ID = 10  # prompts avoid the lowest and highest ids (special tokens live there)


class Conversation(NamedTuple):
    adapter: str | None  # None: the base model
    system: tuple[int, ...]  # shared by every conversation of this adapter
    users: tuple[tuple[int, ...], ...]  # one user message per turn


class TurnRecord(NamedTuple):
    conversation: int
    turn: int
    prompt_tokens: int
    output_ids: tuple[int, ...]
    cached_tokens: int
    ttft_s: float
    latency_s: float


class Delta(Protocol):
    """What the driver reads of an engine output delta (lorasrv.messages.RequestOutput)."""

    @property
    def token_ids(self) -> tuple[int, ...]: ...

    @property
    def cached_tokens(self) -> int: ...


#: Starts one request (prompt ids, adapter) and yields its output deltas.
Submit = Callable[[tuple[int, ...], str | None], AsyncIterator[Delta]]


# ---------------------------------------------------------------------------- workload


def make_conversations(
    adapters: Sequence[str | None], per_adapter: int, *, system_len: int, user_len: int,
    turns: int, vocab_size: int, seed: int = 0,
) -> list[Conversation]:  # fmt: skip
    """Seeded random ids: one system prompt per adapter, one user message per turn each."""
    rng = random.Random(seed)

    def ids(num: int) -> tuple[int, ...]:
        return tuple(rng.randrange(MIN_TOKEN_ID, vocab_size - MIN_TOKEN_ID) for _ in range(num))

    systems = {adapter: ids(system_len) for adapter in adapters}
    return [
        Conversation(adapter, systems[adapter], tuple(ids(user_len) for _ in range(turns)))
        for _ in range(per_adapter)
        for adapter in adapters
    ]


def turn_prompt(conv: Conversation, replies: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The prompt of turn len(replies): system, then (user, reply) pairs, then the new user turn."""
    prompt = list(conv.system)
    for user, reply in zip(conv.users, replies, strict=False):
        prompt += user + reply
    return tuple(prompt + list(conv.users[len(replies)]))


async def run_conversation(submit: Submit, index: int, conv: Conversation) -> list[TurnRecord]:
    """Turns one after the other; each reply goes into the next turn's prompt."""
    records: list[TurnRecord] = []
    replies: list[tuple[int, ...]] = []
    for turn in range(len(conv.users)):
        prompt = turn_prompt(conv, replies)
        output: list[int] = []
        cached, ttft = 0, None
        started = time.perf_counter()
        async for delta in submit(prompt, conv.adapter):
            output += delta.token_ids
            cached = delta.cached_tokens or cached
            if ttft is None and output:
                ttft = time.perf_counter() - started
        latency = time.perf_counter() - started
        replies.append(tuple(output))
        records.append(TurnRecord(index, turn, len(prompt), tuple(output), cached,
                                  latency if ttft is None else ttft, latency))  # fmt: skip
    return records


async def run_workload(
    submit: Submit, conversations: Sequence[Conversation]
) -> tuple[list[TurnRecord], float]:
    """Every conversation at once; (records, wall seconds)."""
    started = time.perf_counter()
    runs = [run_conversation(submit, i, conv) for i, conv in enumerate(conversations)]
    records = [r for conv_records in await asyncio.gather(*runs) for r in conv_records]
    return records, time.perf_counter() - started


# ---------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(records: Sequence[TurnRecord], wall_s: float) -> dict[str, Any]:
    ttfts = [r.ttft_s for r in records]
    output = sum(len(r.output_ids) for r in records)
    prompt = sum(r.prompt_tokens for r in records)
    cached = sum(r.cached_tokens for r in records)
    p50, p90 = percentile(ttfts, 50), percentile(ttfts, 90)
    return {
        "requests": len(records),
        "wall_s": round(wall_s, 3),
        "ttft_p50_ms": None if p50 is None else round(p50 * 1e3, 2),
        "ttft_p90_ms": None if p90 is None else round(p90 * 1e3, 2),
        "output_tok_s": round(output / wall_s, 1) if wall_s > 0 else None,
        "total_tok_s": round((output + prompt) / wall_s, 1) if wall_s > 0 else None,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "cached_tokens": cached,
        "cached_share": round(cached / prompt, 3) if prompt else None,
    }


def compare(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """The two ratios (on / off) and whether each meets its target."""
    ttft = on["ttft_p50_ms"] / off["ttft_p50_ms"] if off["ttft_p50_ms"] else None
    tput = on["output_tok_s"] / off["output_tok_s"] if off["output_tok_s"] else None
    return {
        "prefix_cache_ttft_ratio": None if ttft is None else round(ttft, 3),
        "prefix_cache_throughput_ratio": None if tput is None else round(tput, 3),
        "ttft_target_met": ttft is not None and ttft <= TARGET_TTFT_RATIO,
        "throughput_target_met": tput is not None and tput >= TARGET_THROUGHPUT_RATIO,
    }


def agreement(off: Sequence[TurnRecord], on: Sequence[TurnRecord]) -> float | None:
    """Share of first turns with the same reply in both modes (same prompts there; bf16 batch
    order may move a near-tie, so it is reported, not required)."""
    first = {r.conversation: r.output_ids for r in off if r.turn == 0}
    pairs = [(first[r.conversation], r.output_ids) for r in on if r.turn == 0]
    return round(sum(a == b for a, b in pairs) / len(pairs), 3) if pairs else None


# ---------------------------------------------------------------------------- engine


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--small", action="store_true", help="tiny model on CPU: tests the script")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--per-adapter", type=int, help="conversations per adapter (4; small: 2)")
    p.add_argument("--system-len", type=int, help="system prompt tokens (1000; small: 40)")
    p.add_argument("--user-len", type=int, help="tokens per user turn (64; small: 6)")
    p.add_argument("--reply-len", type=int, help="tokens per reply (64; small: 6)")
    p.add_argument("--turns", type=int, help="turns per conversation (4; small: 3)")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    small = args.small
    for name, big, tiny in (("per_adapter", 4, 2), ("system_len", 1000, 40), ("user_len", 64, 6),
                            ("reply_len", 64, 6), ("turns", 4, 3)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else big)
    if small:
        args.num_adapters = min(args.num_adapters, 2)
    return args


def engine_settings(args: argparse.Namespace, model_dir: Path, adapters: dict[str, Path],
                    *, cache: bool) -> dict[str, Any]:  # fmt: skip
    settings: dict[str, Any] = {
        "model_path": str(model_dir), "device": "cpu" if args.small else "cuda",
        "dtype": "float32" if args.small else "bfloat16",
        "lora_paths": [f"{name}={path}" for name, path in adapters.items()],
        "max_loras_per_batch": max(args.num_adapters, 1), "max_lora_rank": args.rank,
        "disable_radix_cache": not cache,
    }  # fmt: skip
    if args.small:
        settings["num_kv_pages"] = 512
    return settings


async def run_mode(args: argparse.Namespace, model_dir: Path, adapters: dict[str, Path],
                   conversations: list[Conversation], *,
                   cache: bool) -> tuple[list[TurnRecord], float]:  # fmt: skip
    """The workload on a fresh engine, after a warm-up; (records, wall seconds)."""
    import bench_model as bm

    from lorasrv.config import build_config
    from lorasrv.engine.engine import Engine
    from lorasrv.engine.parts import prepare_parts
    from lorasrv.engine.requests import Submission
    from lorasrv.messages import SamplingParams

    config = build_config(engine_settings(args, model_dir, adapters, cache=cache))
    parts = await prepare_parts(config)
    build = parts.runner_factory
    std = bm.mrm.SHAPES["tiny" if args.small else "llama3-8b"].std

    def random_weights_runner() -> Any:
        with bm.random_base_weights(std):
            return build()

    parts = parts._replace(runner_factory=random_weights_runner)
    params = SamplingParams(max_new_tokens=args.reply_len, temperature=0, ignore_eos=True)
    async with Engine(config, parts=parts) as engine:

        def submit(prompt: tuple[int, ...], adapter: str | None) -> AsyncIterator[Delta]:
            return engine.submit(Submission(input_ids=prompt, lora_name=adapter, params=params))

        # Warm-up (kernels, graphs, adapters on the GPU) on prompts that share nothing with the
        # workload's, so the cache starts cold.
        warm = make_conversations(list(adapters) or [None], 1, system_len=32, user_len=8,
                                  turns=1, vocab_size=1000, seed=99)  # fmt: skip
        await run_workload(submit, warm)
        return await run_workload(submit, conversations)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import bench_model as bm
    import torch

    shape = bm.mrm.SHAPES["tiny" if args.small else "llama3-8b"]
    device = torch.device("cpu" if args.small else "cuda")
    names: list[str | None] = [f"a{i}" for i in range(args.num_adapters)] or [None]
    conversations = make_conversations(
        names, args.per_adapter, system_len=args.system_len, user_len=args.user_len,
        turns=args.turns, vocab_size=shape.vocab,
    )  # fmt: skip
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (--small)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": os.environ.get("LORASRV_COMMIT", "unknown"),
        "workload": {k: getattr(args, k) for k in ("num_adapters", "per_adapter", "system_len",
                                                   "user_len", "reply_len", "turns", "rank")},
    }  # fmt: skip
    scratch = bm.scratch_dir()
    try:
        model_dir = scratch / "model"
        bm.write_model_dir(model_dir, shape, "float32" if args.small else "bfloat16")
        adapters = bm.write_adapters(scratch / "adapters", model_dir, shape, args.num_adapters,
                                     args.rank, device)  # fmt: skip
        runs = {}
        for mode, cache in (("off", False), ("on", True)):
            run = run_mode(args, model_dir, adapters, conversations, cache=cache)
            runs[mode], wall = asyncio.run(run)
            out[f"cache_{mode}"] = summarize(runs[mode], wall)
            print(mode, out[f"cache_{mode}"], flush=True)
            gc.collect()  # the engine's model and KV cache, before the next one is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out.update(compare(out["cache_off"], out["cache_on"]))
    out["first_turn_agreement"] = agreement(runs["off"], runs["on"])
    paths = [args.out] + (
        [Path(os.environ["OUT"]) / "prefix.json"] if os.environ.get("OUT") else []
    )
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
