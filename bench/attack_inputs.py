"""Inputs of bench/attack.py: hostile request generators (each `rng -> (name, path, post
kwargs)`) and adapter folders broken in every way issue 15 lists."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

Request = tuple[str, str, dict[str, Any]]
ADAPTERS = [None, "demo-lora-a", "demo-lora-b", "no-such-adapter"]
WORDS = [
    "the",
    "a",
    "of",
    "cat",
    "dog",
    "ran",
    "over",
    "hello",
    "world",
    "time",
    "once",
    "upon",
    "zebra",
    "42",
    "ü",
    "☃",
    "\n",
    "\t",
    "{}",
    "<|eot_id|>",
]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _sampling(rng: random.Random) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": rng.choice([1, 2, 8, 32, 0, -1, 10**9])}
    for key, values in (
        ("temperature", [0, 0.7, 1.5, -1, 1e308]),
        ("top_p", [0.1, 1.0, 0, 2]),
        ("top_k", [-1, 1, 50, -7]),
        ("min_p", [0, 0.5, 3]),
        ("stop", [["."], ["x"] * 40, [""], "the"]),
        ("stop_token_ids", [[2], [10**9]]),
        ("repetition_penalty", [1.0, 0, 1e30]),
        ("seed", [1, -1, 2**70]),
        ("ignore_eos", [True, "yes"]),
    ):
        if rng.random() < 0.3:
            params[key] = rng.choice(values)
    return params


def generate(rng: random.Random) -> Request:
    body: dict[str, Any] = {"sampling_params": _sampling(rng), "lora_path": rng.choice(ADAPTERS)}
    if rng.random() < 0.5:
        body["text"] = _text(rng, rng.randrange(0, 40))
    elif rng.random() < 0.5:
        body["input_ids"] = [rng.randrange(-2, 1100) for _ in range(rng.randrange(0, 30))]
    else:
        body["text"] = [_text(rng, 5) for _ in range(rng.randrange(1, 40))]
        body["lora_path"] = [rng.choice(ADAPTERS) for _ in body["text"]]
    body["stream"] = rng.random() < 0.3
    return "generate", "/generate", {"json": body}


def completions(rng: random.Random) -> Request:
    body: dict[str, Any] = {
        "model": rng.choice(["lorasrv-demo", "demo-lora-a", "lorasrv-demo:demo-lora-b", "x"]),
        "prompt": rng.choice([_text(rng, 8), [_text(rng, 3)] * 3, [1, 2, 3], [[1, 2], [3]], ""]),
        "max_tokens": rng.choice([1, 8, 16, 0, 100000]),
    }
    options = [("n", [1, 3, 16, 17]), ("logprobs", [0, 5, 21]), ("echo", [True]),
               ("stream", [True]), ("stop", ["\n", ["a"] * 50]), ("seed", [7])]  # fmt: skip
    for key, values in options:
        if rng.random() < 0.25:
            body[key] = rng.choice(values)
    return "completions", "/v1/completions", {"json": body}


def chat(rng: random.Random) -> Request:
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    content: Any = rng.choice([_text(rng, 6), [{"type": "text", "text": "hi"}], image, None, 5])
    body = {
        "model": rng.choice(["lorasrv-demo", "demo-lora-b"]),
        "messages": [
            {"role": rng.choice(["user", "system", "assistant", "tool", "x"]), "content": content}
        ]
        * rng.randrange(0, 4),
        "max_tokens": rng.choice([4, 16]),
        "stream": rng.random() < 0.3,
        "logprobs": rng.random() < 0.2,
    }
    return "chat", "/v1/chat/completions", {"json": body}


def malformed(rng: random.Random) -> Request:
    path = rng.choice(["/generate", "/v1/completions", "/v1/chat/completions", "/tokenize",
                       "/load_lora_adapter", "/detokenize", "/abort_request"])  # fmt: skip
    data = rng.choice([
        b"{not json", b"", b"null", b"[]", b'{"text": 1e400}', b'{"text": "\\ud800"}',
        json.dumps({"text": "hi", "sampling_params": {"max_new_tokens": "many"}}).encode(),
        b"[" * 5000 + b"]" * 5000, bytes(rng.randrange(256) for _ in range(64)),
    ])  # fmt: skip
    return "malformed", path, {"data": data, "headers": {"Content-Type": "application/json"}}


def encodings(rng: random.Random) -> Request:
    coding, data = rng.choice([
        ("gzip", b"\x00 not gzip"), ("gzip", gzip.compress(b'{"text": "hi"}')[:-9]),
        ("br", b"\x1b\x00"), ("zstd", b"(\xb5/\xfd"), ("deflate", b"zz"),
        ("gzip", gzip.compress(b'{"text": "hi", "sampling_params": {"max_new_tokens": 2}}')),
    ])  # fmt: skip
    path = rng.choice(["/generate", "/v1/completions", "/tokenize", "/load_lora_adapter"])
    headers = {"Content-Encoding": coding, "Content-Type": "application/json"}
    return "encoding", path, {"data": data, "headers": headers}


def oversized(rng: random.Random) -> Request:
    choice = rng.randrange(4)
    if choice == 0 and rng.random() < 0.2:  # a 10 MB prompt, now and then
        return "10mb-prompt", "/generate", {"json": {"text": "hello world " * 900_000}}
    if choice == 1:
        return "5000-batch", "/generate", {"json": {"text": ["hi"] * 5000}}
    if choice == 2:
        body = {"text": "hi", "lora_path": "n" * rng.choice([300, 100_000])}
        return "long-name", "/generate", {"json": body}
    body = {"lora_name": "n" * 100_000, "lora_path": "/tmp"}
    return "long-name-load", "/load_lora_adapter", {"json": body}


def admin(rng: random.Random) -> Request:
    path = rng.choice(["/", "/etc", "../..", "org/model-that-is-not-there", "/dev/zero", ""])
    body = {"lora_name": rng.choice(["demo-lora-a", "x", ""]), "lora_path": path}
    route = rng.choice(["/load_lora_adapter", "/v1/load_lora_adapter"])
    return "admin", route, {"json": body}


def tokenize(rng: random.Random) -> Request:
    if rng.random() < 0.5:
        return "tokenize", "/tokenize", {"json": {"prompt": _text(rng, rng.randrange(0, 2000))}}
    ids = [rng.randrange(-5, 2000) for _ in range(rng.randrange(0, 500))]
    return "detokenize", "/detokenize", {"json": {"tokens": ids}}


def abort(rng: random.Random) -> Request:
    return "abort", "/abort_request", {"json": {"rid": f"req-{rng.randrange(100)}"}}


HOSTILE: list[Callable[[random.Random], Request]] = [
    generate, generate, generate, completions, completions, chat, malformed, encodings,
    oversized, admin, tokenize, abort,
]  # fmt: skip


def broken_adapters(workdir: Path) -> dict[str, Path]:
    """name -> adapter folder: two good copies of the demo adapters, and one per breakage."""
    import torch
    from safetensors.torch import load_file, save_file

    from lorasrv.demo import ensure_demo_model

    demo = ensure_demo_model().adapters
    out: dict[str, Path] = {}

    def copy(name: str, source: str, config: dict[str, Any] | None = None,
             edit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:  # fmt: skip
        path = Path(shutil.copytree(demo[source], workdir / name))
        if config:
            raw = json.loads((path / "adapter_config.json").read_text())
            (path / "adapter_config.json").write_text(json.dumps({**raw, **config}))
        if edit is not None:
            weights = path / "adapter_model.safetensors"
            state = {k: edit(v.clone()) for k, v in load_file(str(weights)).items()}
            save_file(state, str(weights))
        out[name] = path

    copy("good-a", "demo-lora-a")
    copy("good-b", "demo-lora-b")
    copy("alpha-1e308", "demo-lora-a", {"lora_alpha": 1e308})
    copy("alpha-0", "demo-lora-a", {"lora_alpha": 0})
    copy("nan", "demo-lora-a", edit=lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))
    copy("inf", "demo-lora-b", edit=lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))
    copy("huge", "demo-lora-b", edit=lambda t: t * 1e8)
    copy("int8", "demo-lora-a", edit=lambda t: (t * 100).to(torch.int8))
    copy("regex", "demo-lora-a", {"target_modules": "(.*)*x"})
    copy("rslora-yes", "demo-lora-a", {"use_rslora": "yes"})
    copy("no-targets", "demo-lora-a", {"target_modules": []})
    copy("added-list", "demo-lora-a")
    (out["added-list"] / "added_tokens.json").write_text('["<tool>"]')
    return out
