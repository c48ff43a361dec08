"""A step's sampled tokens on their way to the host: pinned copies behind an event, so the runner
can queue the next step before waiting for this one. Copies only; sampler.py chooses tokens.
"""

from __future__ import annotations

import torch

from lorasrv.messages import StepResult, TokenLogprob


class PendingSample:
    """A step's choices on their way to the host: `token_ids` stays on the device (the next step
    may read it before the host does); `result()` waits for this step's copies only, not for
    work queued after it."""

    __slots__ = ("_done", "_host", "_num_rows", "_result", "_top_ks", "_top_rows", "token_ids")

    def __init__(
        self,
        token_ids: torch.Tensor,
        extras: list[torch.Tensor],
        top_rows: list[int],
        top_ks: list[int],
        num_rows: int,
    ) -> None:
        self.token_ids = token_ids  # [n] int64, device
        self._top_rows, self._top_ks = top_rows, top_ks
        self._result: StepResult | None = None
        tensors = [token_ids, *extras]  # chosen logprobs, then top values and ids, if asked
        self._done: torch.cuda.Event | None = None
        if token_ids.is_cuda:
            # NOTE: pinned targets make the copies asynchronous; the event marks their end.
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, t in zip(self._host, tensors, strict=True):
                host.copy_(t, non_blocking=True)
            self._done = torch.cuda.current_stream(token_ids.device).record_event()
        else:
            self._host = tensors
        self._num_rows = num_rows

    def result(self) -> StepResult:
        if self._result is None:
            if self._done is not None:
                self._done.synchronize()
            lists = [t.tolist() for t in self._host]
            token_ids, logprobs = lists[0], lists[1] if len(lists) > 1 else []
            top_logprobs: list[tuple[TokenLogprob, ...]] = []
            if len(lists) > 2:
                top_logprobs = [() for _ in range(self._num_rows)]
                rows = zip(self._top_rows, self._top_ks, lists[2], lists[3], strict=True)
                for row, k, values, ids in rows:
                    top_logprobs[row] = tuple(map(TokenLogprob, ids[:k], values[:k]))
            self._result = StepResult(
                token_ids=tuple(token_ids),
                logprobs=tuple(logprobs),
                top_logprobs=tuple(top_logprobs),
            )
        return self._result
