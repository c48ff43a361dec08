"""Serving load generator: streams seeded random-id prompts at a running lorasrv `/generate`.

Measures TTFT, inter-token latency, end-to-end latency and throughput; stdlib + aiohttp only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

MIN_TOKEN_ID: Final = 10  # prompts avoid the lowest and highest ids (special tokens live there)
VOCAB_MARGIN: Final = 10
DONE_PAYLOAD: Final = "[DONE]"
BASE_ADAPTER: Final = "none"
PERCENTILES: Final = (50, 90, 99)


# ----------------------------------------------------------------------------- SSE


class SseParser:
    """Incremental SSE decoder: feed raw bytes, get the `data` payload of each complete event."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        events: list[str] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                return events
            line = self._buffer[:end].rstrip(b"\r").decode("utf-8")
            self._buffer = self._buffer[end + 1 :]
            if not line:  # a blank line ends the event
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
            # comments (":") and other fields (event:, id:, retry:) carry nothing we need

    def flush(self) -> list[str]:
        """An event the stream ended without a blank line after."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        return events


async def iter_sse(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    parser = SseParser()
    async for chunk in content.iter_any():
        for payload in parser.feed(chunk):
            yield payload
    for payload in parser.flush():
        yield payload


# ----------------------------------------------------------------------------- requests


@dataclass
class RequestResult:
    index: int
    adapter: str | None
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class RequestSpec:
    index: int
    input_ids: list[int]
    adapter: str | None  # None: the base model
    max_new_tokens: int


def make_prompts(num: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`num` prompts of `input_len` ids drawn uniformly from [10, vocab_size - 10)."""
    low, high = MIN_TOKEN_ID, vocab_size - VOCAB_MARGIN
    if high <= low:
        raise ValueError(f"vocab_size {vocab_size} is too small for ids in [{low}, {high})")
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(input_len)] for _ in range(num)]


def parse_adapters(spec: str) -> list[str | None]:
    """`a,b,none` -> ['a', 'b', None]; `none` (any case) or an empty item is the base model."""
    names = [item.strip() for item in spec.split(",")]
    return [None if not name or name.lower() == BASE_ADAPTER else name for name in names]


def make_specs(
    prompts: Sequence[list[int]], adapters: Sequence[str | None], output_len: int
) -> list[RequestSpec]:
    return [
        RequestSpec(i, ids, adapters[i % len(adapters)], output_len)
        for i, ids in enumerate(prompts)
    ]


def request_body(spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input_ids": spec.input_ids,
        "sampling_params": {
            "max_new_tokens": spec.max_new_tokens,
            "ignore_eos": True,
            "temperature": 0,
        },
        "stream": True,
    }
    if spec.adapter is not None:
        body["lora_path"] = spec.adapter
    return body


async def send_request(
    session: aiohttp.ClientSession, url: str, spec: RequestSpec
) -> RequestResult:
    """One streamed request; every failure is recorded in the result, never raised."""
    result = RequestResult(index=spec.index, adapter=spec.adapter)
    result.prompt_tokens = len(spec.input_ids)
    start = last = time.perf_counter()
    received = 0
    done = False
    try:
        async with session.post(f"{url}/generate", json=request_body(spec)) as response:
            if response.status != 200:
                text = (await response.text())[:300]
                result.error = f"HTTP {response.status}: {text}"
                return result
            async for payload in iter_sse(response.content):
                if payload.strip() == DONE_PAYLOAD:
                    done = True
                    break
                chunk = json.loads(payload)
                if not isinstance(chunk, dict):
                    result.error = f"unexpected event: {payload[:200]}"
                    return result
                if "error" in chunk:
                    result.error = f"error event: {json.dumps(chunk['error'])[:300]}"
                    return result
                now = time.perf_counter()
                count = len(chunk.get("output_ids") or [])  # cumulative
                meta = chunk.get("meta_info") or {}
                result.prompt_tokens = int(meta.get("prompt_tokens") or result.prompt_tokens)
                result.output_tokens = int(meta.get("completion_tokens") or count)
                if count > received:
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        added = count - received
                        result.itl_s.extend([(now - last) / added] * added)
                    received, last = count, now
    except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if not done:
        result.error = "stream ended without [DONE]"
        return result
    if result.ttft_s is None:
        result.error = "no output token"
        return result
    result.latency_s = time.perf_counter() - start
    result.ok = True
    return result


# ----------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(values: Sequence[float], prefix: str) -> dict[str, float]:
    stats = {f"{prefix}_p{q}_ms": percentile(values, q) * 1e3 for q in PERCENTILES}
    stats[f"{prefix}_mean_ms"] = mean(values) * 1e3
    return stats


def compute_metrics(results: Sequence[RequestResult], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    wall = wall_s if wall_s > 0 else math.nan
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    metrics: dict[str, Any] = {
        "requests_ok": len(ok),
        "requests_failed": len(results) - len(ok),
        "wall_s": wall_s,
        "request_throughput": len(ok) / wall,
        "output_token_throughput": output_tokens / wall,
        "total_token_throughput": (prompt_tokens + output_tokens) / wall,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
    }
    metrics |= summarize([r.ttft_s for r in ok if r.ttft_s is not None], "ttft")
    metrics |= summarize([gap for r in ok for gap in r.itl_s], "itl")
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    metrics["e2e_p50_ms"] = percentile(latencies, 50) * 1e3
    metrics["e2e_p99_ms"] = percentile(latencies, 99) * 1e3
    metrics["errors"] = dict(sorted(errors.items(), key=lambda item: -item[1])[:10])
    return metrics


# ----------------------------------------------------------------------------- driver


async def fetch_vocab_size(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(f"{url}/get_model_info") as response:
        response.raise_for_status()
        info = await response.json(content_type=None)
    return int(info["vocab_size"])


async def run_load(
    session: aiohttp.ClientSession,
    url: str,
    specs: Sequence[RequestSpec],
    *,
    concurrency: int,
    request_rate: float,
    timeout_s: float,
    seed: int,
) -> tuple[list[RequestResult], float]:
    """Send `specs` (Poisson arrivals at `request_rate`, or all at once when inf) with at most
    `concurrency` in flight; requests unfinished after `timeout_s` are cancelled and failed.
    """
    limit = asyncio.Semaphore(concurrency)
    rng = random.Random(seed + 1)
    tasks: list[asyncio.Task[RequestResult]] = []

    async def limited(spec: RequestSpec) -> RequestResult:
        async with limit:
            return await send_request(session, url, spec)

    async def launch_and_wait() -> None:
        for spec in specs:
            tasks.append(asyncio.create_task(limited(spec)))
            if math.isfinite(request_rate) and request_rate > 0:
                await asyncio.sleep(rng.expovariate(request_rate))
        await asyncio.wait(tasks)

    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await launch_and_wait()
    except TimeoutError:
        pass
    wall_s = time.perf_counter() - start
    results: list[RequestResult] = []
    for spec, task in zip(specs, tasks, strict=False):
        if task.done() and not task.cancelled():
            results.append(task.result())
        else:
            task.cancel()
            results.append(RequestResult(spec.index, spec.adapter, error="timed out"))
    results += [
        RequestResult(spec.index, spec.adapter, error="not sent (timed out)")
        for spec in specs[len(tasks) :]
    ]
    await asyncio.gather(*tasks, return_exceptions=True)  # let cancelled requests close
    return results, wall_s


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up (unmeasured) then the measured run; `timeout_s` bounds all of it."""
    deadline = time.perf_counter() + args.timeout_s

    def left() -> float:
        return max(0.0, deadline - time.perf_counter())

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=connector
    ) as session:
        url = args.url.rstrip("/")
        vocab_size = args.vocab_size
        if not vocab_size:
            async with asyncio.timeout(min(left(), 60.0)):
                vocab_size = await fetch_vocab_size(session, url)
        adapters = parse_adapters(args.adapters)
        warmup_failed = 0
        if args.warmup_requests > 0:
            warm = make_prompts(args.warmup_requests, args.input_len, vocab_size, args.seed + 7)
            warm_results, _ = await run_load(
                session,
                url,
                make_specs(warm, adapters, args.output_len),
                concurrency=args.concurrency,
                request_rate=math.inf,
                timeout_s=left(),
                seed=args.seed,
            )
            warmup_failed = sum(1 for r in warm_results if not r.ok)
        prompts = make_prompts(args.num_requests, args.input_len, vocab_size, args.seed)
        results, wall_s = await run_load(
            session,
            url,
            make_specs(prompts, adapters, args.output_len),
            concurrency=args.concurrency,
            request_rate=args.request_rate,
            timeout_s=left(),
            seed=args.seed,
        )
    metrics = compute_metrics(results, wall_s)
    metrics["warmup_failed"] = warmup_failed
    metrics["vocab_size"] = vocab_size
    return metrics


def format_report(metrics: dict[str, Any], args: argparse.Namespace) -> str:
    def row(label: str, value: str) -> str:
        return f"{label:<34}{value}"

    def stats(prefix: str) -> str:
        parts = [f"p{q} {metrics[f'{prefix}_p{q}_ms']:.2f}" for q in PERCENTILES]
        return " / ".join(parts) + f" / mean {metrics[f'{prefix}_mean_ms']:.2f}"

    lines = [
        "=" * 22 + " lorasrv serving benchmark " + "=" * 22,
        row("Adapters (round-robin):", args.adapters),
        row("Concurrency / request rate:", f"{args.concurrency} / {args.request_rate}"),
        row("Input / output tokens:", f"{args.input_len} / {args.output_len}"),
        row("Requests ok / failed:", f"{metrics['requests_ok']} / {metrics['requests_failed']}"),
        row("Wall time (s):", f"{metrics['wall_s']:.2f}"),
        row("Request throughput (req/s):", f"{metrics['request_throughput']:.2f}"),
        row("Output token throughput (tok/s):", f"{metrics['output_token_throughput']:.2f}"),
        row("Total token throughput (tok/s):", f"{metrics['total_token_throughput']:.2f}"),
        row("TTFT ms (p50/p90/p99/mean):", stats("ttft")),
        row("ITL ms (p50/p90/p99/mean):", stats("itl")),
        row(
            "E2E latency ms (p50/p99):",
            f"{metrics['e2e_p50_ms']:.2f} / {metrics['e2e_p99_ms']:.2f}",
        ),
    ]
    for error, count in metrics["errors"].items():
        lines.append(row("  failed:", f"{count} x {error}"))
    lines.append("=" * 71)
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """Strict JSON: NaN (no samples) becomes null, an infinite rate the string "inf"."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8, help="most requests in flight")
    parser.add_argument("--input-len", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--output-len", type=int, default=64, help="max_new_tokens (ignore_eos)")
    parser.add_argument(
        "--adapters", default=BASE_ADAPTER, help="comma list, round-robin; 'none' = base model"
    )
    parser.add_argument(
        "--request-rate", type=float, default=math.inf, help="req/s, Poisson arrivals; inf = all"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="bound on the whole run")
    parser.add_argument(
        "--warmup-requests", type=int, default=0, help="unmeasured requests sent first"
    )
    parser.add_argument("--vocab-size", type=int, help="skip GET /get_model_info")
    parser.add_argument("--api-key", default=os.environ.get("LORASRV_API_KEY"))
    parser.add_argument("--json", metavar="FILE", help="write the figures and arguments here")
    args = parser.parse_args(argv)
    for name in ("num_requests", "concurrency", "input_len", "output_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """0 when at least one request succeeded, 1 when none did, 2 when the server is unreachable."""
    args = parse_args(argv)
    try:
        metrics = asyncio.run(benchmark(args))
    except (aiohttp.ClientError, OSError, KeyError, ValueError, TimeoutError) as exc:
        print(f"load.py: cannot benchmark {args.url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(format_report(metrics, args))
    if args.json:
        arguments = {k: v for k, v in vars(args).items() if k not in {"api_key", "json"}}
        report = json_safe({"args": arguments, **metrics})
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, allow_nan=False)
            f.write("\n")
    return 0 if metrics["requests_ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
