"""Embed lorasrv in your own aiohttp app: no HTTP hop, the Engine runs in your event loop.

`python examples/embed_in_app.py` builds the demo model (no model path given: adapters
`demo-lora-a` and `demo-lora-b`), shows generate / stream / unload / load, then serves
`POST /ask {"question": ..., "adapter": ...}` on 127.0.0.1:8080, asks it once and exits
(`--serve` keeps serving until Ctrl-C). For a real model: `Engine.from_args(model_path=...,
lora_paths=["name=/path/to/adapter"])`, the CLI's options in snake_case.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from lorasrv import Engine, SamplingParams, Submission
from lorasrv.errors import LorasrvError

ENGINE = web.AppKey("engine", Engine)
GREEDY = SamplingParams(max_new_tokens=24, temperature=0)


async def tour(engine: Engine) -> None:
    """The library API in five calls."""
    out = await engine.generate(
        Submission(text="Once upon a time", lora_name="demo-lora-a", params=GREEDY)
    )
    print(f"--- generate, demo-lora-a ({out.completion_tokens} tokens, {out.finish_reason})")
    print(out.text)

    print("--- stream, demo-lora-b")
    handle = engine.submit(
        Submission(text="Once upon a time", lora_name="demo-lora-b", params=GREEDY)
    )
    async for delta in handle:  # each output carries the text added since the previous one
        print(delta.text, end="", flush=True)
    print()

    path = {status.name: status.path for status in await engine.describe_adapters()}["demo-lora-b"]
    done = await engine.unload_adapter("demo-lora-b")
    print(f"--- unload demo-lora-b: success={done.success}, loaded={sorted(done.loaded_adapters)}")
    try:
        await engine.generate(Submission(text="hi", lora_name="demo-lora-b"))
    except LorasrvError as exc:  # AdapterNotFound (404): unloaded names are gone, not reloaded
        print(f"    then generate -> {exc.status} {exc.code}: {exc}")
    done = await engine.load_adapter("demo-lora-b", path)
    print(f"--- load demo-lora-b again: success={done.success}")


async def ask(request: web.Request) -> web.Response:
    """Your own route, answered by the embedded engine."""
    body: dict[str, Any] = await request.json()
    submission = Submission(text=body["question"], lora_name=body.get("adapter"), params=GREEDY)
    try:
        out = await request.app[ENGINE].generate(submission)
    except LorasrvError as exc:
        return web.json_response({"error": exc.detail}, status=exc.status)
    return web.json_response({"answer": out.text})


def build_app(engine: Engine) -> web.Application:
    app = web.Application()
    app[ENGINE] = engine
    app.router.add_post("/ask", ask)
    return app


async def run(options: dict[str, Any], port: int, serve: bool) -> int:
    async with Engine.from_args(**options) as engine:  # starts and stops every actor
        await tour(engine)
        runner = web.AppRunner(build_app(engine))
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            if serve:
                print(f"--- serving POST http://127.0.0.1:{port}/ask (Ctrl-C to stop)")
                await asyncio.Event().wait()
            await ask_once(port)
        finally:
            await runner.cleanup()
    return 0


async def ask_once(port: int) -> None:
    body = {"question": "What is a LoRA adapter?", "adapter": "demo-lora-a"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/ask", json=body) as resp,
    ):
        print(f"--- POST /ask -> {resp.status}: {await resp.json()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--serve", action="store_true", help="keep serving /ask")
    try:
        args = parser.parse_args()
        return asyncio.run(run({}, args.port, args.serve))  # {}: the demo model
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
