"""The official `openai` package against lorasrv: a completion served by an adapter, then a
streamed chat answer from `base:adapter`, then the model list.

Run the server first (`python -m lorasrv` serves the demo model with adapters `demo-lora-a`
and `demo-lora-b` on 127.0.0.1:30000), then `python examples/openai_client.py`.
"""

from __future__ import annotations

import argparse

import openai


def run(base_url: str, api_key: str) -> int:
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=300)
    base = client.models.list().data[0].id  # the base model comes first, then the adapters

    # `model` picks what serves the request: the base name, an adapter name, or "base:adapter".
    completion = client.completions.create(
        model="demo-lora-a", prompt="The quick brown fox", max_tokens=24, temperature=0
    )
    print(f"--- completion by demo-lora-a ({completion.usage})")
    print(completion.choices[0].text)

    print(f"--- chat, streamed, by {base}:demo-lora-b")
    stream = client.chat.completions.create(
        model=f"{base}:demo-lora-b",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"top_k": 20},  # SGLang's sampling extensions ride in the body
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage is not None:
            print(f"\n({chunk.usage})")

    try:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
    except openai.NotFoundError as exc:
        print(f"--- unknown model -> {exc.status_code} {exc.code}")
    print("--- models:", ", ".join(model.id for model in client.models.list().data))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:30000/v1")
    parser.add_argument("--api-key", default="none", help="the server's --api-key, if it has one")
    args = parser.parse_args()
    return run(args.base_url, args.api_key)


if __name__ == "__main__":
    raise SystemExit(main())
