"""SGLang's native wire format: a `/generate` body -> typed Submissions, results -> SGLang's
result dicts, and the `/get_model_info` / `/get_server_info` bodies. No aiohttp, so other front
ends (a Ray Serve ingress) reuse it. Values are checked by the engine, not here: this module
only answers the questions of shape (which prompts, how lists pair up, SGLang's `n`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple, TypeVar, cast

import msgspec

from lorasrv.engine.engine import Engine
from lorasrv.engine.request_handle import RequestHandle
from lorasrv.engine.requests import Submission
from lorasrv.engine.results import RequestResult, ResultBuilder
from lorasrv.errors import BadRequest
from lorasrv.http.outputs import merged
from lorasrv.http.schemas import GenerateRequest, GenerateSamplingParams
from lorasrv.messages import SamplingParams

_T = TypeVar("_T")
MAX_SAMPLES = 128  # SGLang's n: samples per prompt


class GenerateBatch(NamedTuple):
    """One engine request per output: prompt p's sample i is output p*n + i (SGLang's order)."""

    submissions: list[Submission]
    is_batch: bool  # the answer is a list (a list of prompts, or n > 1)
    want_logprobs: list[bool]  # per output: meta_info carries output_token_logprobs


def parse_generate(body: GenerateRequest) -> GenerateBatch:
    prompts, is_batch = _prompts(body)
    count = len(prompts)
    starts = _per_item(body.logprob_start_len, count, "logprob_start_len")
    if any(start != -1 for start in starts):
        raise BadRequest("logprob_start_len: prompt logprobs are not supported; leave it at -1")
    params = _per_item(body.sampling_params, count, "sampling_params")
    loras = _per_item(body.lora_path, count, "lora_path")
    wants = _per_item(body.return_logprob, count, "return_logprob")
    tops = _per_item(body.top_logprobs_num, count, "top_logprobs_num")
    n = _num_samples(params)
    rids = _request_ids(body.rid, count, n)
    submissions = []
    for p, prompt in enumerate(prompts):
        base = sampling_params(params[p], wants[p] or tops[p] > 0, tops[p])
        for i in range(n):
            seeded = base
            if base.seed is not None and i:
                seeded = msgspec.structs.replace(base, seed=base.seed + i)  # own seed stream
            submissions.append(
                Submission(
                    text=prompt if isinstance(prompt, str) else None,
                    input_ids=tuple(prompt) if isinstance(prompt, list) else None,
                    params=seeded,
                    lora_name=loras[p],
                    request_id=rids[p * n + i],
                )
            )
    wanted = [s.params.logprobs for s in submissions]
    return GenerateBatch(submissions, is_batch=is_batch or n > 1, want_logprobs=wanted)


def sampling_params(
    raw: GenerateSamplingParams | None, logprobs: bool = False, num_top: int = 0
) -> SamplingParams:
    """SGLang's sampling_params (left-out fields: engine defaults) plus top-level logprob asks."""
    fields: dict[str, Any] = {}
    if raw is not None:
        fields = {k: v for k, v in msgspec.structs.asdict(raw).items() if v is not None}
        fields.pop("n", None)
        seed = fields.pop("sampling_seed", None)
        if seed is not None:
            fields.setdefault("seed", seed)
        if isinstance(fields.get("stop"), str):
            fields["stop"] = [fields["stop"]]  # one string or a list, as SGLang takes it
    if logprobs:
        fields.update(logprobs=True, top_logprobs=num_top)
    return msgspec.convert(fields, SamplingParams)


def _prompts(body: GenerateRequest) -> tuple[list[str] | list[list[int]], bool]:
    if (body.text is None) == (body.input_ids is None):
        raise BadRequest("give exactly one of text or input_ids")
    if isinstance(body.text, str):
        return [body.text], False
    if body.text is not None:
        if not body.text:
            raise BadRequest("text: an empty list; give at least one prompt")
        return body.text, True
    single, batch = split_token_lists(body.input_ids or [], "input_ids")
    return ([single], False) if single is not None else (batch or [], True)


def split_token_lists(
    raw: list[int | list[int]], field: str
) -> tuple[list[int] | None, list[list[int]] | None]:
    """(one list of ids, None) or (None, a list of them); a mix of both is a 400."""
    ids = [item for item in raw if isinstance(item, int)]
    if len(ids) == len(raw):
        return ids, None
    rows = [item for item in raw if isinstance(item, list)]
    if len(rows) != len(raw):
        raise BadRequest(f"{field}: a list of token ids or a list of such lists, not a mix")
    return None, rows


def _per_item(value: _T | Sequence[_T], count: int, name: str) -> list[_T]:
    if isinstance(value, list):
        if len(value) != count:
            raise BadRequest(f"{name} has {len(value)} entries for {count} prompt(s)")
        return list(value)
    return [cast("_T", value)] * count


def _num_samples(params: Sequence[GenerateSamplingParams | None]) -> int:
    counts = {1 if p is None else p.n for p in params}
    if len(counts) > 1:
        raise BadRequest("sampling_params: n must be the same for every prompt of a batch")
    n = counts.pop()
    if not 1 <= n <= MAX_SAMPLES:
        raise BadRequest(f"sampling_params: n must be in [1, {MAX_SAMPLES}], got {n}")
    return n


def _request_ids(rid: str | list[str] | None, count: int, n: int) -> list[str | None]:
    """SGLang's rules: a string for many outputs gets `_<k>` per output; a list, one per prompt."""
    num = count * n
    if rid is None:
        return [None] * num
    if isinstance(rid, str):
        return [rid] if num == 1 else [f"{rid}_{k}" for k in range(num)]
    rids: list[str] = _per_item(rid, count, "rid")
    return list(rids) if n == 1 else [f"{r}_{i}" for r in rids for i in range(n)]


# ----------------------------------------------------------------------------- answers


def generate_item(
    result: RequestResult, started_s: float, *, want_logprobs: bool, index: int | None = None
) -> dict[str, Any]:
    """One /generate result (cumulative text and ids); `index` marks a batch stream's chunks."""
    finish: dict[str, Any] | None = None
    if result.finish_reason is not None:
        finish = {"type": result.finish_reason}
        if result.finish_reason == "stop":
            finish["matched"] = result.matched_stop
        elif result.finish_reason == "length":
            finish["length"] = result.completion_tokens
    meta: dict[str, Any] = {
        "id": result.request_id,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens,
        "finish_reason": finish,
        "e2e_latency": time.monotonic() - started_s,
    }
    if want_logprobs:
        meta["output_token_logprobs"] = [
            [logprob, token_id, [[t.logprob, t.token_id] for t in top]]
            for logprob, token_id, top in zip(
                result.logprobs, result.token_ids, _tops(result), strict=False
            )
        ]
    item: dict[str, Any] = {"text": result.text, "output_ids": list(result.token_ids)}
    item["meta_info"] = meta
    if index is not None:
        item["index"] = index
    return item


async def stream_items(
    handles: Sequence[RequestHandle], batch: GenerateBatch, started_s: float
) -> AsyncIterator[dict[str, Any]]:
    """Cumulative /generate dicts as outputs arrive; a batch's (or `n`'s) carry their `index`."""
    builders = [ResultBuilder(handle.request_id) for handle in handles]
    async with contextlib.aclosing(merged(handles)) as outputs:
        async for index, out in outputs:
            builders[index].add(out)
            yield generate_item(
                builders[index].result(), started_s,
                want_logprobs=batch.want_logprobs[index],
                index=index if batch.is_batch else None,
            )  # fmt: skip


def _tops(result: RequestResult) -> list[Any]:
    tops = list(result.top_logprobs)
    return tops + [()] * (len(result.token_ids) - len(tops))


def model_info(engine: Engine) -> dict[str, Any]:
    ready = engine.ready_info
    return {
        "model_path": engine.model_path,
        "served_model_name": engine.served_model_name,
        "tokenizer_path": engine.config.model.tokenizer_path or engine.model_path,
        "is_generation": True,
        "context_length": ready.context_length,
        "vocab_size": ready.vocab_size,
        "dtype": ready.dtype,
        "device": ready.device,
    }


async def server_info(engine: Engine) -> dict[str, Any]:
    adapters = await engine.describe_adapters()
    return {
        "config": msgspec.to_builtins(engine.config),
        "runner": msgspec.to_builtins(engine.ready_info),
        "scheduler": engine.last_stats._asdict(),
        "adapters": [msgspec.to_builtins(a) for a in adapters],
        "uptime_s": time.time() - engine.started_s,
        "healthy": engine.is_healthy(),
    }
