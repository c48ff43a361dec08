"""FakeEngine: the Engine surface the HTTP layer uses, with deterministic outputs and a call log.

Shape checks live in the engine (embedding users need them too); this fake mimics them and their
messages (BadRequest, AdapterNotFound, PromptTooLong). Token i of a reply is `f" {tag}{i}"`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import msgspec

from lorasrv.config import ServerConfig, build_config
from lorasrv.engine.stats import SchedulerStats
from lorasrv.errors import AdapterNotFound, BadRequest, EngineDead, PromptTooLong
from lorasrv.ids import AdapterId, OpId, RequestId
from lorasrv.messages import (
    AdapterOpDone,
    AdapterStatus,
    ChatMessage,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from lorasrv.metrics import Metrics, RequestTracker

CONTEXT_LENGTH = 64
EMPTY_PROMPT = "the prompt is empty: give non-empty text or input_ids"
DEMO_ADAPTERS = {"demo-lora-a": "/adapters/demo-lora-a", "demo-lora-b": "/adapters/demo-lora-b"}


class Item(NamedTuple):
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    lora_name: str | None


class FakeEngine:
    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.adapters: dict[str, tuple[str, bool]] = {
            name: (path, False) for name, path in DEMO_ADAPTERS.items()
        }
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.aborted: list[str] = []  # rids whose client went away (cancel or early close)
        self.started = asyncio.Event()  # a generate/stream request got past validation
        self.abort_seen = asyncio.Event()
        self.hold = False  # requests wait for `release` before answering
        self.release = asyncio.Event()
        self.chunk_delay_s = 0.0
        self.fail_after_chunks: int | None = None
        self.failure: Exception = EngineDead("engine stopped mid-request")
        self.healthy = True
        # "generator": an async generator (checks at the first __anext__, cancellation reaches
        # its finally); "object": an iterator object (checks at the call; only aclose() aborts)
        self.stream_style = "generator"
        self.is_started = False
        self.is_stopped = False
        self.metrics = Metrics()
        self.last_stats = SchedulerStats(num_running=1, num_waiting=2, num_kv_pages=10,
                                         num_kv_pages_used=4)  # fmt: skip
        self._num_rids = 0
        self._num_ops = 0

    @classmethod
    def from_args(cls, **options: object) -> FakeEngine:
        return cls(build_config(dict(options)))

    async def start(self) -> None:
        self.is_started = True

    async def stop(self) -> None:
        self.is_stopped = True

    async def __aenter__(self) -> FakeEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def served_model_name(self) -> str:
        model = self.config.model
        return model.served_model_name or model.model_path or "lorasrv-demo"

    def is_healthy(self) -> bool:
        return self.healthy

    # ------------------------------------------------------------------------- requests

    async def generate(
        self,
        *,
        text: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        lora_path: str | list[str | None] | None = None,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        kwargs = {"text": text, "input_ids": input_ids, "sampling_params": sampling_params}
        self.calls.append(("generate", {**kwargs, "lora_path": lora_path, "rid": rid}))
        items, is_batch = self._items(text, input_ids, sampling_params, lora_path, rid)
        self.started.set()
        try:
            if self.hold:
                await self.release.wait()
        except asyncio.CancelledError:
            self._abort(item.rid for item in items)
            raise
        outputs = [self._output(item, item.params.max_new_tokens, 0.0) for item in items]
        return outputs if is_batch else outputs[0]

    def stream(
        self,
        *,
        text: str | None = None,
        input_ids: list[int] | None = None,
        sampling_params: dict[str, Any] | None = None,
        lora_path: str | None = None,
        rid: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        kwargs = {"text": text, "input_ids": input_ids, "sampling_params": sampling_params}
        self.calls.append(("stream", {**kwargs, "lora_path": lora_path, "rid": rid}))
        if self.stream_style == "object":
            items, is_batch = self._items(text, input_ids, sampling_params, lora_path, rid)
            if is_batch:
                raise BadRequest("streaming takes one prompt, not a batch")
            self.started.set()
            return ChunkStream(self, items[0])
        return self._stream(text, input_ids, sampling_params, lora_path, rid)

    async def _stream(
        self,
        text: Any,
        input_ids: Any,
        sampling_params: Any,
        lora_path: Any,
        rid: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        # Validation runs at the first __anext__, as in an async-generator engine.
        items, is_batch = self._items(text, input_ids, sampling_params, lora_path, rid)
        if is_batch:
            raise BadRequest("streaming takes one prompt, not a batch")
        item = items[0]
        self.started.set()
        finished = False
        try:
            for count in range(1, item.params.max_new_tokens + 1):
                if self.fail_after_chunks is not None and count > self.fail_after_chunks:
                    finished = True  # the engine ended it, not the client
                    raise self.failure
                if self.hold:
                    await self.release.wait()
                await asyncio.sleep(self.chunk_delay_s)
                yield self._output(item, count, 0.0)
            finished = True
        finally:
            if not finished:
                self._abort([item.rid])

    def submit(
        self,
        *,
        params: SamplingParams,
        text: str | None = None,
        input_ids: list[int] | tuple[int, ...] | None = None,
        messages: list[ChatMessage] | tuple[ChatMessage, ...] | None = None,
        lora_name: str | None = None,
        request_id: str | None = None,
    ) -> FakeHandle:
        """Engine.submit: checks at once, then one output per token (`max_new_tokens` of them)."""
        kwargs = {"text": text, "input_ids": input_ids, "messages": messages}
        self.calls.append(
            ("submit", {**kwargs, "params": params, "lora_name": lora_name, "rid": request_id})
        )
        if params.max_new_tokens < 1:
            raise BadRequest(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if messages is not None:
            text = "".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>"
        prompts, _ = _prompts(text, list(input_ids) if input_ids is not None else None)
        if lora_name is not None and lora_name not in self.adapters:
            raise AdapterNotFound(f"adapter {lora_name!r} is not loaded")
        if len(prompts[0]) > CONTEXT_LENGTH:
            raise PromptTooLong(f"prompt has {len(prompts[0])} tokens; limit {CONTEXT_LENGTH}")
        self._num_rids += 1
        item = Item(request_id or f"fake-{self._num_rids}", prompts[0], params, lora_name)
        self.started.set()
        return FakeHandle(self, item, self.metrics.track(item.rid, lora_name))

    def decode_tokens(self, ids: Any) -> list[str]:
        return [f"<{token_id}>" for token_id in ids]

    def _abort(self, rids: Any) -> None:
        self.aborted.extend(rids)
        self.abort_seen.set()

    def _items(
        self, text: Any, input_ids: Any, sampling_params: Any, lora_path: Any, rid: Any
    ) -> tuple[list[Item], bool]:
        prompts, is_batch = _prompts(text, input_ids)
        num = len(prompts)
        params = [_params(p) for p in _per_item("sampling_params", sampling_params, num, is_batch)]
        loras = _per_item("lora_path", lora_path, num, is_batch)
        rids = _per_item("rid", rid, num, is_batch)
        for name in loras:
            if name is not None and name not in self.adapters:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
        items = []
        for prompt, param, lora, given_rid in zip(prompts, params, loras, rids, strict=True):
            if len(prompt) > CONTEXT_LENGTH:
                raise PromptTooLong(f"prompt has {len(prompt)} tokens; limit {CONTEXT_LENGTH}")
            self._num_rids += 1
            items.append(Item(given_rid or f"fake-{self._num_rids}", prompt, param, lora))
        return items, is_batch

    def _output(self, item: Item, count: int, latency_s: float) -> dict[str, Any]:
        tag = item.lora_name or "base"
        ids = [(sum(item.prompt_ids) + i) % 256 for i in range(count)]
        done = count == item.params.max_new_tokens
        meta: dict[str, Any] = {
            "id": item.rid,
            "prompt_tokens": len(item.prompt_ids),
            "completion_tokens": count,
            "cached_tokens": 0,
            "finish_reason": {"type": "length", "length": count} if done else None,
            "e2e_latency": latency_s,
        }
        if item.params.logprobs:
            meta["output_token_logprobs"] = [[-0.5, token, None] for token in ids]
        return {
            "text": "".join(f" {tag}{i}" for i in range(count)),
            "output_ids": ids,
            "meta_info": meta,
        }

    # ------------------------------------------------------------------------- adapters

    async def load_adapter(
        self, lora_name: str, lora_path: str, pinned: bool = False
    ) -> AdapterOpDone:
        self.calls.append(
            ("load_adapter", {"lora_name": lora_name, "lora_path": lora_path, "pinned": pinned})
        )
        if lora_name in self.adapters:
            return self._op(False, f"adapter {lora_name!r} is already loaded; unload it first")
        if lora_path.startswith("/missing"):
            return self._op(False, f"cannot read adapter folder {lora_path!r}")
        num_pinned = sum(is_pinned for _, is_pinned in self.adapters.values()) + pinned
        if num_pinned > (self.config.adapters.max_loras_per_batch or 8) - 1:
            return self._op(False, "too many pinned adapters (--max-loras-per-batch - 1)")
        self.adapters[lora_name] = (lora_path, pinned)
        return self._op(True, "")

    async def unload_adapter(self, lora_name: str) -> AdapterOpDone:
        self.calls.append(("unload_adapter", {"lora_name": lora_name}))
        if self.adapters.pop(lora_name, None) is None:
            return self._op(False, f"adapter {lora_name!r} is not loaded")
        return self._op(True, "")

    def _op(self, success: bool, error_message: str) -> AdapterOpDone:
        self._num_ops += 1
        loaded = {name: path for name, (path, _) in self.adapters.items()}
        return AdapterOpDone(
            op_id=OpId(self._num_ops),
            success=success,
            error_message=error_message,
            loaded_adapters=loaded,
        )

    async def describe_adapters(self) -> tuple[AdapterStatus, ...]:
        return tuple(
            AdapterStatus(
                name=name,
                path=path,
                adapter_id=AdapterId(index),
                rank=8,
                phase="ready",
                host="loaded",
                pinned=pinned,
                num_refs=0,
            )
            for index, (name, (path, pinned)) in enumerate(self.adapters.items())
        )

    def model_info(self) -> dict[str, Any]:
        model = self.config.model
        return {
            "model_path": model.model_path or "demo",
            "tokenizer_path": model.tokenizer_path,
            "is_generation": True,
            "served_model_name": self.served_model_name,
        }

    async def server_info(self) -> dict[str, Any]:
        adapters = await self.describe_adapters()
        return {"config": self.config, "adapters": list(adapters), "stats": {"num_running": 0}}


class FakeHandle:
    """Engine.RequestHandle: deltas of one token, text `f" {tag}{i}"`, logprob -0.5 - i/100."""

    def __init__(self, engine: FakeEngine, item: Item, tracker: RequestTracker) -> None:
        self.engine = engine
        self.item = item
        self.request_id = item.rid
        self.tracker = tracker
        self.count = 0
        self.finished = False

    def __aiter__(self) -> FakeHandle:
        return self

    async def __anext__(self) -> RequestOutput:
        params = self.item.params
        if self.finished:
            raise StopAsyncIteration
        if (
            self.engine.fail_after_chunks is not None
            and self.count >= self.engine.fail_after_chunks
        ):
            self.finished = True
            raise self.engine.failure
        if self.engine.hold:
            await self.engine.release.wait()
        await asyncio.sleep(self.engine.chunk_delay_s)
        i = self.count
        self.count += 1
        done = self.count == params.max_new_tokens
        self.finished = done
        token = (sum(self.item.prompt_ids) + i) % 256
        tops = tuple(
            TokenLogprob(token + j, -0.5 - i / 100 - j) for j in range(params.top_logprobs)
        )
        out = RequestOutput(
            request_id=RequestId(self.item.rid),
            text=f" {self.item.lora_name or 'base'}{i}",
            token_ids=(token,),
            logprobs=(-0.5 - i / 100,) if params.logprobs else (),
            top_logprobs=(tops,) if params.logprobs else (),
            finished=done,
            finish_reason="length" if done else None,
            prompt_tokens=len(self.item.prompt_ids),
            completion_tokens=self.count,
        )
        self.tracker.observe(out)
        return out

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self.tracker.aborted()
            self.engine._abort([self.item.rid])


class ChunkStream:
    """A stream as an object: cancelling `__anext__` aborts nothing, only `aclose()` does."""

    def __init__(self, engine: FakeEngine, item: Item) -> None:
        self.engine = engine
        self.item = item
        self.count = 0

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self.count == self.item.params.max_new_tokens:
            raise StopAsyncIteration
        await asyncio.sleep(self.engine.chunk_delay_s)
        self.count += 1
        return self.engine._output(self.item, self.count, 0.0)

    async def aclose(self) -> None:
        if self.count < self.item.params.max_new_tokens:
            self.engine._abort([self.item.rid])


def _prompts(text: Any, input_ids: Any) -> tuple[list[list[int]], bool]:
    if (text is None) == (input_ids is None):
        raise BadRequest("give exactly one of text or input_ids")
    if text is not None:
        texts = text if isinstance(text, list) else [text]
        if not texts or any(not item for item in texts):
            raise BadRequest(EMPTY_PROMPT)
        return [[ord(char) % 256 for char in item] for item in texts], isinstance(text, list)
    is_batch = bool(input_ids) and isinstance(input_ids[0], list)
    prompts = input_ids if is_batch else [input_ids]
    if any(not prompt for prompt in prompts):
        raise BadRequest(EMPTY_PROMPT)
    return [list(prompt) for prompt in prompts], is_batch


def _per_item(field: str, value: Any, num: int, is_batch: bool) -> list[Any]:
    if not isinstance(value, list):
        return [value] * num
    if not is_batch or len(value) != num:
        raise BadRequest(f"{field} has {len(value)} entries for {num} prompt(s)")
    return value


def _params(raw: dict[str, Any] | None) -> SamplingParams:
    try:
        params = msgspec.convert(raw or {}, SamplingParams)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"sampling_params: {exc}") from None
    if params.max_new_tokens < 1:
        raise BadRequest(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    return params


__all__ = ["DEMO_ADAPTERS", "FakeEngine"]
