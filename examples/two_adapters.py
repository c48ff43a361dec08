"""One batched /generate call where each prompt picks its own adapter (or the base model).

Run the server first (`python -m lorasrv` serves the demo model with adapters `demo-lora-a`
and `demo-lora-b` on 127.0.0.1:30000), then `python examples/two_adapters.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp

ADAPTERS = ["demo-lora-a", "demo-lora-b", None]  # None: the base model


async def run(url: str, api_key: str | None) -> int:
    prompt = "The quick brown fox"
    body = {
        "text": [prompt] * len(ADAPTERS),
        "sampling_params": {"max_new_tokens": 24, "temperature": 0},
        "lora_path": ADAPTERS,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session,
        session.post(f"{url}/generate", json=body, headers=headers) as resp,
    ):
        answer = await resp.json()
    if resp.status != 200:
        print(f"error {resp.status}: {answer}", file=sys.stderr)
        return 1
    for adapter, item in zip(ADAPTERS, answer, strict=True):
        meta = item["meta_info"]
        print(f"--- {adapter or 'base model'} ({meta['completion_tokens']} tokens)")
        print(prompt + item["text"])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    return asyncio.run(run(args.url, args.api_key))


if __name__ == "__main__":
    raise SystemExit(main())
