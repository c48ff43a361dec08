"""SGLang /generate arguments -> one submit() call per prompt. Pure; shape errors are BadRequest."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

from lorasrv.engine.validation import to_sampling_params
from lorasrv.errors import BadRequest
from lorasrv.messages import SamplingParams


class SubmitArgs(NamedTuple):
    """Exactly the keyword arguments of Engine.submit."""

    params: SamplingParams
    text: str | None
    input_ids: list[int] | None
    lora_name: str | None
    request_id: str | None


class GenerateBatch(NamedTuple):
    items: list[SubmitArgs]
    is_batch: bool
    want_logprobs: bool


def normalize_generate(
    *,
    text: str | list[str] | None = None,
    input_ids: list[int] | list[list[int]] | None = None,
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
    lora_path: str | list[str | None] | None = None,
    rid: str | list[str] | None = None,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
    **unknown: Any,
) -> GenerateBatch:
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    prompts, is_batch = _prompts(text, input_ids)
    count = len(prompts)
    params_list = [_params(p, return_logprob, top_logprobs_num) for p in _per_item(
        sampling_params, count, "sampling_params", dict
    )]  # fmt: skip
    loras = _per_item(lora_path, count, "lora_path", str)
    rids = _per_item(rid, count, "rid", str)
    if is_batch and rid is not None and not isinstance(rid, list):
        raise BadRequest("rid must be a list with one id per prompt for a batch")
    items = [
        SubmitArgs(
            params=params_list[i],
            text=prompt if isinstance(prompt, str) else None,
            input_ids=prompt if isinstance(prompt, list) else None,
            lora_name=loras[i],
            request_id=rids[i],
        )
        for i, prompt in enumerate(prompts)
    ]
    want = any(p.logprobs or p.top_logprobs > 0 for p in params_list)
    return GenerateBatch(items=items, is_batch=is_batch, want_logprobs=want)


def _prompts(
    text: str | list[str] | None, input_ids: list[int] | list[list[int]] | None
) -> tuple[list[str] | list[list[int]], bool]:
    if (text is None) == (input_ids is None):
        raise BadRequest("give exactly one of text or input_ids")
    if isinstance(text, str):
        if not text:
            raise BadRequest("text is empty: give a non-empty prompt")
        return [text], False
    if isinstance(text, list):
        if not text or not all(isinstance(t, str) and t for t in text):
            raise BadRequest("text must be a non-empty string or a non-empty list of them")
        return text, True
    if not isinstance(input_ids, list) or not input_ids:
        raise BadRequest("input_ids must be a non-empty list of token ids (or of lists)")
    if all(isinstance(i, int) and not isinstance(i, bool) for i in input_ids):
        return [cast("list[int]", list(input_ids))], False
    if all(isinstance(row, list) and row for row in input_ids):
        rows = cast("list[list[int]]", input_ids)
        if not all(isinstance(i, int) and not isinstance(i, bool) for row in rows for i in row):
            raise BadRequest("input_ids must contain integers only")
        return rows, True
    raise BadRequest("input_ids must be a list of ints or a list of non-empty lists of ints")


def _per_item(value: Any, count: int, name: str, kind: type) -> list[Any]:
    if isinstance(value, list):
        if len(value) != count:
            raise BadRequest(f"{name} has {len(value)} entries for {count} prompt(s)")
        bad = [v for v in value if v is not None and not isinstance(v, kind)]
        if bad:
            raise BadRequest(f"{name} entries must be {kind.__name__} or null, got {bad[0]!r}")
        return value
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f"{name} must be a {kind.__name__}, a list or null")
    return [value] * count


def _params(raw: dict[str, Any] | None, return_logprob: bool, top_n: int) -> SamplingParams:
    params = to_sampling_params(raw)
    if return_logprob or top_n:
        import msgspec

        params = msgspec.structs.replace(
            params, logprobs=True, top_logprobs=max(top_n, params.top_logprobs)
        )
    return params
