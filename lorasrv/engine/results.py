"""Folds a request's output deltas into SGLang's /generate result dict. Pure."""

from __future__ import annotations

import time
from typing import Any

from lorasrv.messages import RequestOutput


class ResultBuilder:
    """Accumulates deltas; `to_dict()` is the /generate item (cumulative text and ids)."""

    __slots__ = (
        "_finish",
        "_logprobs",
        "_matched",
        "_started_s",
        "cached_tokens",
        "completion_tokens",
        "output_ids",
        "prompt_tokens",
        "request_id",
        "text",
        "want_logprobs",
    )

    def __init__(self, request_id: str, *, want_logprobs: bool = False) -> None:
        self.request_id = request_id
        self.want_logprobs = want_logprobs
        self.text = ""
        self.output_ids: list[int] = []
        self._logprobs: list[list[Any]] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._finish: str | None = None
        self._matched: int | str | None = None
        self._started_s = time.monotonic()

    @property
    def finished(self) -> bool:
        return self._finish is not None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.output_ids.extend(out.token_ids)
        if self.want_logprobs:
            for i, (token_id, logprob) in enumerate(zip(out.token_ids, out.logprobs, strict=False)):
                top = out.top_logprobs[i] if i < len(out.top_logprobs) else ()
                self._logprobs.append([logprob, token_id, [[t.logprob, t.token_id] for t in top]])
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.completion_tokens or self.completion_tokens
        self.cached_tokens = out.cached_tokens or self.cached_tokens
        if out.finished:
            self._finish = out.finish_reason
            self._matched = out.matched_stop

    def to_dict(self) -> dict[str, Any]:
        finish: dict[str, Any] | None = None
        if self._finish is not None:
            finish = {"type": self._finish}
            if self._finish == "stop":
                finish["matched"] = self._matched
            elif self._finish == "length":
                finish["length"] = self.completion_tokens
        meta: dict[str, Any] = {
            "id": self.request_id,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reason": finish,
            "e2e_latency": time.monotonic() - self._started_s,
        }
        if self.want_logprobs:
            meta["output_token_logprobs"] = self._logprobs
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}
