"""`GET /openapi.json`: an OpenAPI 3.1 document generated from the wire types (msgspec's JSON
Schema), for the SGLang, OpenAI and admin routes. Built once; reads no engine state.

/generate answers are dicts built in `sglang.py`; the Structs here only describe them (the
schemathesis test checks real answers against this document).
"""

from __future__ import annotations

import functools
from typing import Any, Final

import msgspec
from aiohttp import web

from lorasrv import __version__
from lorasrv.http import openai_schemas as oa
from lorasrv.http import schemas as sg
from lorasrv.http.responses import json_response
from lorasrv.http.state import ENGINE_KEY

EVENT_STREAM: Final = {"text/event-stream": {"schema": {"type": "string"}}}
PLAIN_TEXT: Final = {"text/plain": {"schema": {"type": "string"}}}
FREE_FORM: Final = {"application/json": {"schema": {"type": "object"}}}


class FinishReason(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    matched: str | int | None = None
    length: int | None = None


class GenerateMetaInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: FinishReason | None
    e2e_latency: float
    output_token_logprobs: list[Any] | None = None


class GenerateItem(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    output_ids: list[int]
    meta_info: GenerateMetaInfo
    index: int | None = None


class Version(msgspec.Struct, frozen=True, kw_only=True):
    version: str


class Status(msgspec.Struct, frozen=True, kw_only=True):
    status: str


# path -> method -> (summary, request type, 200 answers: JSON types (any of them) and other media
# types); errors are the route's error shape (SGLang's; OpenAI's under /v1/; the admin shape).
_OPS: Final[dict[str, dict[str, tuple[str, Any, tuple[Any, ...]]]]] = {
    "/generate": {"post": ("SGLang generate", sg.GenerateRequest,
                           (GenerateItem, list[GenerateItem], EVENT_STREAM))},
    "/abort_request": {"post": ("abort a request by rid, or all", sg.AbortRequest, ())},
    "/tokenize": {"post": ("text -> token ids", sg.TokenizeRequest,
                           (sg.TokenizeResponse, sg.TokenizeBatchResponse))},
    "/detokenize": {"post": ("token ids -> text", sg.DetokenizeRequest, (sg.DetokenizeResponse,))},
    "/load_lora_adapter": {"post": ("load an adapter (SGLang)", sg.LoadLoraRequest,
                                    (sg.AdapterOpResponse,))},
    "/unload_lora_adapter": {"post": ("unload an adapter (SGLang)", sg.UnloadLoraRequest,
                                      (sg.AdapterOpResponse,))},
    "/flush_cache": {"post": ("drop every unused cached KV page", None, (PLAIN_TEXT,)),
                     "get": ("drop every unused cached KV page", None, (PLAIN_TEXT,))},
    "/v1/load_lora_adapter": {"post": ("load an adapter (vLLM)", sg.VllmLoadLoraRequest,
                                       (PLAIN_TEXT,))},
    "/v1/unload_lora_adapter": {"post": ("unload an adapter (vLLM)", sg.VllmUnloadLoraRequest,
                                         (PLAIN_TEXT,))},
    "/v1/models": {"get": ("the base model, then every adapter", None, (sg.ModelList,))},
    "/v1/models/{model_id}": {"get": ("one model card", None, (sg.ModelCard,))},
    "/v1/completions": {"post": ("OpenAI completions", oa.CompletionRequest,
                                 (oa.Completion, EVENT_STREAM))},
    "/v1/chat/completions": {"post": ("OpenAI chat completions", oa.ChatCompletionRequest,
                                      (oa.ChatCompletion, EVENT_STREAM))},
    "/metrics": {"get": ("Prometheus text", None, (PLAIN_TEXT,))},
    "/health": {"get": ("liveness", None, (Status,))},
    "/health_generate": {"get": ("liveness through one generated token", None, (FREE_FORM,))},
    "/get_model_info": {"get": ("model facts", None, (FREE_FORM,))},
    "/get_server_info": {"get": ("configuration and adapter states", None, (FREE_FORM,))},
    "/server_info": {"get": ("configuration and adapter states", None, (FREE_FORM,))},
    "/version": {"get": ("the server's version", None, (Version,))},
}  # fmt: skip


def _examples(model: str) -> dict[str, dict[str, Any]]:
    """One valid body per route (clients and fuzzers start from these)."""
    chat = [{"role": "user", "content": "Hello"}]
    return {
        "/generate": {"text": "Hello", "sampling_params": {"max_new_tokens": 8}},
        "/abort_request": {"rid": "no-such-request"},
        "/tokenize": {"prompt": "Hello"},
        "/detokenize": {"tokens": [1, 2, 3]},
        "/v1/completions": {"model": model, "prompt": "Hello", "max_tokens": 8},
        "/v1/chat/completions": {"model": model, "messages": chat, "max_tokens": 8},
        "/unload_lora_adapter": {"lora_name": "no-such-adapter"},
        "/v1/unload_lora_adapter": {"lora_name": "no-such-adapter"},
    }


@functools.cache
def openapi_document(model: str = "default") -> dict[str, Any]:
    """The whole document: every route's operation, the wire types under components; `model`
    (the served model name) goes into the examples."""
    types: list[Any] = [sg.ErrorResponse, oa.OpenAIErrorResponse, sg.AdapterOpResponse]
    for methods in _OPS.values():
        for _, request, answers in methods.values():
            types += [t for t in (request, *answers) if t is not None and not _is_media(t)]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    schema_of = {repr(t): s for t, s in zip(types, schemas, strict=True)}
    examples = _examples(model)
    paths = {
        path: {
            method: _operation(path, op, schema_of, examples.get(path))
            for method, op in methods.items()
        }
        for path, methods in _OPS.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "lorasrv", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(openapi_document(request.app[ENGINE_KEY].served_model_name))


def _is_media(answer: Any) -> bool:
    return isinstance(answer, dict)


def _operation(
    path: str, op: tuple[str, Any, tuple[Any, ...]], schema_of: dict[str, Any], example: Any
) -> dict[str, Any]:
    summary, request, answers = op
    content: dict[str, Any] = {}
    json_schemas = [schema_of[repr(a)] for a in answers if not _is_media(a)]
    if json_schemas:
        schema = json_schemas[0] if len(json_schemas) == 1 else {"anyOf": json_schemas}
        content["application/json"] = {"schema": schema}
    for media in (a for a in answers if _is_media(a)):
        content |= media
    ok: dict[str, Any] = {"description": "success"}
    if content:
        ok["content"] = content
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": ok, "default": _error_response(path, schema_of)},
    }
    if "{model_id}" in path:
        operation["parameters"] = [
            {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
        ]
    if request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema_of[repr(request)]}},
        }
        if example is not None:
            operation["requestBody"]["content"]["application/json"]["example"] = example
    return operation


def _error_response(path: str, schema_of: dict[str, Any]) -> dict[str, Any]:
    if path in ("/load_lora_adapter", "/unload_lora_adapter"):
        # SGLang's admin shape for its own failures; the auth and body-size answers are SGLang's
        shapes = [schema_of[repr(sg.AdapterOpResponse)], schema_of[repr(sg.ErrorResponse)]]
        schema: dict[str, Any] = {"anyOf": shapes}
    elif path.startswith("/v1/"):
        schema = schema_of[repr(oa.OpenAIErrorResponse)]
    else:
        schema = schema_of[repr(sg.ErrorResponse)]
    return {"description": "error", "content": {"application/json": {"schema": schema}}}
