"""Issue 15's multi-tenant attack on the demo model (CPU): fuzzed and hostile requests, adapter
churn (good and broken adapters) under load, and disconnect storms, while canary batches check
that every tenant's greedy output stays what it was on the idle server. Ends by checking for
leaked KV pages and adapter references, and prints a JSON summary.

    python bench/attack.py --duration 60            # starts a demo server on a free port
    python bench/attack.py --url http://host:port   # or attacks a running one
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from bench.attack_inputs import HOSTILE, broken_adapters  # noqa: E402

CANARY = [([5, 6, 7, 8], None), ([9, 10, 11], "demo-lora-a"), ([40, 41], "demo-lora-b"),
          ([300, 301, 302], "demo-lora-a"), ([77], None)]  # fmt: skip
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


class Tally:
    def __init__(self) -> None:
        self.statuses: collections.Counter[str] = collections.Counter()
        self.server_errors: list[str] = []
        self.wrong_outputs: list[str] = []
        self.transport_errors: collections.Counter[str] = collections.Counter()
        self.requests = 0

    def record(self, kind: str, status: int, body: str = "") -> None:
        self.requests += 1
        self.statuses[f"{kind} {status}"] += 1
        if status >= 500 and not (status == 503 and "overloaded" in body):
            self.server_errors.append(f"{kind} {status}: {body[:300]}")


async def post(session: aiohttp.ClientSession, tally: Tally, kind: str, url: str,
               **kwargs: Any) -> tuple[int, str]:  # fmt: skip
    try:
        async with session.post(url, **kwargs) as resp:
            body = await resp.text()
            tally.record(kind, resp.status, body)
            return resp.status, body
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally.transport_errors[f"{kind} {type(exc).__name__}"] += 1
        return 0, ""


async def canary_outputs(session: aiohttp.ClientSession, url: str, tally: Tally) -> list[Any]:
    body = {"input_ids": [ids for ids, _ in CANARY], "lora_path": [a for _, a in CANARY],
            "sampling_params": GREEDY}  # fmt: skip
    status, text = await post(session, tally, "canary", f"{url}/generate", json=body)
    return [item["output_ids"] for item in json.loads(text)] if status == 200 else []


async def canaries(url: str, tally: Tally, expected: list[Any], stop: float) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < stop:
            got = await canary_outputs(session, url, tally)
            if got and got != expected:
                tally.wrong_outputs.append(json.dumps({"expected": expected, "got": got}))


async def fuzzer(url: str, tally: Tally, stop: float, seed: int) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        while time.monotonic() < stop:
            name, path, kwargs = rng.choice(HOSTILE)(rng)
            await post(session, tally, f"fuzz:{name}", f"{url}{path}", **kwargs)


async def churn(url: str, tally: Tally, stop: float, adapters: dict[str, Path], seed: int) -> None:
    rng = random.Random(seed)
    good = [n for n in adapters if n.startswith("good")]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        while time.monotonic() < stop:
            name = rng.choice(list(adapters))
            served = f"{name}-{rng.randrange(4)}"
            body = {"lora_name": served, "lora_path": str(adapters[name])}
            status, _ = await post(session, tally, "churn:load", f"{url}/load_lora_adapter",
                                   json=body)  # fmt: skip
            if name not in good and status == 200:
                tally.server_errors.append(f"broken adapter {name} was accepted")
            gen = {"input_ids": [[5, 6, 7]] * 3, "lora_path": served, "sampling_params": GREEDY}
            await post(session, tally, "churn:generate", f"{url}/generate", json=gen)
            await post(session, tally, "churn:unload", f"{url}/unload_lora_adapter",
                       json={"lora_name": served})  # fmt: skip


async def disconnects(url: str, tally: Tally, stop: float, seed: int) -> None:
    rng = random.Random(seed)
    long = {"max_new_tokens": 200, "ignore_eos": True}
    while time.monotonic() < stop:
        body = {"text": "Once upon a time", "stream": rng.random() < 0.7,
                "lora_path": rng.choice([None, "demo-lora-a", "demo-lora-b"]),
                "sampling_params": long}  # fmt: skip
        try:
            async with aiohttp.ClientSession() as session:
                task = asyncio.ensure_future(session.post(f"{url}/generate", json=body))
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                if task.done() and not task.exception():
                    resp = task.result()
                    tally.record("disconnect", resp.status)
                    await resp.content.readline()
                    resp.close()  # mid-stream
                else:
                    task.cancel()  # before the answer
                    tally.record("disconnect", 0)
                await asyncio.gather(task, return_exceptions=True)
        except aiohttp.ClientError as exc:
            tally.transport_errors[f"disconnect {type(exc).__name__}"] += 1


async def leaks(url: str) -> dict[str, Any]:
    """Wait for the server to go idle; what it still holds then is leaked."""
    try:
        return await _leaks(url)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"server_unreachable": repr(exc)}


async def _leaks(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 60
        while True:
            async with session.get(f"{url}/get_server_info") as resp:
                info = await resp.json()
            sched = info["scheduler"]
            refs = {a["name"]: a["num_refs"] for a in info["adapters"] if a["num_refs"]}
            idle = sched["num_running"] == sched["num_waiting"] == sched["num_acquiring"] == 0
            if (
                idle and not refs and sched["num_kv_pages_used"] == 0
            ) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        async with session.get(f"{url}/health") as resp:
            healthy = resp.status == 200
    return {
        "kv_pages_used": sched["num_kv_pages_used"],
        "running": sched["num_running"],
        "waiting": sched["num_waiting"],
        "adapter_refs": refs,
        "healthy_after": healthy,
    }


async def attack(url: str, duration_s: float, workdir: Path) -> dict[str, Any]:
    tally = Tally()
    adapters = broken_adapters(workdir)
    async with aiohttp.ClientSession() as session:
        expected = await canary_outputs(session, url, tally)  # on the idle server
    assert expected, "the canary batch failed on the idle server"
    stop = time.monotonic() + duration_s
    started = time.monotonic()
    workers = [canaries(url, tally, expected, stop)]
    workers += [fuzzer(url, tally, stop, seed) for seed in range(4)]
    workers += [churn(url, tally, stop, adapters, seed) for seed in range(2)]
    workers += [disconnects(url, tally, stop, seed) for seed in range(2)]
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - started
    async with aiohttp.ClientSession() as session:  # after the storm: outputs unchanged
        after = await canary_outputs(session, url, tally)
    if after != expected:
        tally.wrong_outputs.append(json.dumps({"after": after, "expected": expected}))
    return {
        "requests": tally.requests,
        "seconds": round(elapsed, 1),
        "server_errors_5xx": len(tally.server_errors),
        "server_error_samples": tally.server_errors[:10],
        "wrong_outputs": len(tally.wrong_outputs),
        "wrong_output_samples": tally.wrong_outputs[:3],
        "transport_errors": dict(tally.transport_errors),
        "statuses": dict(sorted(tally.statuses.items())),
        "leaks": await leaks(url),
    }


def start_demo_server() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "kernels")])}  # fmt: skip
    args = [sys.executable, "-m", "lorasrv", "--port", str(port), "--log-level", "warning",
            "--log-stats-interval", "0"]  # fmt: skip
    return subprocess.Popen(args, env=env, cwd=root), f"http://127.0.0.1:{port}"


async def wait_up(url: str, server: subprocess.Popen[bytes] | None) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        for _ in range(600):
            assert server is None or server.poll() is None, "the server exited"
            try:
                async with session.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("the server did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="attack this server instead of starting a demo one")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of attack")
    args = parser.parse_args()
    server, url = (None, args.url) if args.url else start_demo_server()
    workdir = Path(tempfile.mkdtemp(prefix="lorasrv-attack-"))
    try:
        asyncio.run(wait_up(url, server))
        summary = asyncio.run(attack(url, args.duration, workdir))
        summary["server_alive"] = server is None or server.poll() is None
        print(json.dumps(summary, indent=1))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
