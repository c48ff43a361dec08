"""Stream one completion from a running `python -m lorasrv` over SSE, printing text as it arrives.

Run the server first (`python -m lorasrv` serves the demo model on 127.0.0.1:30000), then
`python examples/stream_client.py [--lora demo-lora-a] [--api-key KEY] "Once upon a time"`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import aiohttp


async def stream(args: argparse.Namespace) -> int:
    body = {
        "text": args.prompt,
        "sampling_params": {"max_new_tokens": args.max_new_tokens, "temperature": 0},
        "lora_path": args.lora,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    printed = ""  # chunks carry the cumulative text; print only what is new
    timeout = aiohttp.ClientTimeout(total=300)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(f"{args.url}/generate", json=body, headers=headers) as resp,
    ):
        if resp.status != 200:
            print(f"error {resp.status}: {await resp.text()}", file=sys.stderr)
            return 1
        async for raw_line in resp.content:
            line = raw_line.decode().strip()
            if not line.startswith("data: "):
                continue  # the blank line between events
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                print(f"\nerror: {chunk['error']['message']}", file=sys.stderr)
                return 1
            print(chunk["text"][len(printed) :], end="", flush=True)
            printed = chunk["text"]
            finish = chunk["meta_info"]["finish_reason"]
    print(f"\n[finish: {finish}]")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--lora", default=None, help="adapter name (default: the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--api-key", default=None)
    return asyncio.run(stream(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
