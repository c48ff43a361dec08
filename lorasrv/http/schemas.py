"""SGLang-side bodies of the HTTP API (and the admin routes') as msgspec Structs: the one
definition of each wire type; unknown fields are rejected (400).

Shapes only: value checks (lengths, ranges, adapter names) belong to the engine.
"""

import msgspec


class GenerateSamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """SGLang's `sampling_params` as lorasrv serves them. A field left out (or null) takes the
    engine's default. `n` asks for n samples per prompt; `sampling_seed` is SGLang's name for
    `seed`."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    sampling_seed: int | None = None
    n: int = 1


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """SGLang's `/generate` body. `input_ids` items are ids or (batch) lists of ids."""

    text: str | list[str] | None = None
    input_ids: list[int | list[int]] | None = None
    sampling_params: GenerateSamplingParams | list[GenerateSamplingParams] | None = None
    lora_path: str | list[str | None] | None = None
    stream: bool = False
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    top_logprobs_num: int | list[int] = 0
    logprob_start_len: int | list[int] = -1


class LoadLoraRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """SGLang's `/load_lora_adapter`."""

    lora_name: str
    lora_path: str
    pinned: bool = False


class UnloadLoraRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    lora_name: str


class VllmLoadLoraRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `/v1/load_lora_adapter`; `pinned` is SGLang's, accepted here too."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False
    pinned: bool = False


class VllmUnloadLoraRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    lora_name: str
    lora_int_id: int | None = None


class AdapterOpResponse(msgspec.Struct, frozen=True, kw_only=True):
    success: bool
    error_message: str = ""
    loaded_adapters: dict[str, str] = msgspec.field(default_factory=dict)


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    message: str
    type: str
    code: int


class ErrorResponse(msgspec.Struct, frozen=True, kw_only=True):
    error: ErrorDetail


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "lorasrv"
    root: str
    parent: str | None


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


class AbortRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """SGLang's `/abort_request`: one request by id, or every one in flight."""

    rid: str = ""
    abort_all: bool = False


class TokenizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    prompt: str | list[str]
    add_special_tokens: bool = True


class TokenizeResponse(msgspec.Struct, frozen=True, kw_only=True):
    tokens: list[int]
    count: int
    max_model_len: int


class TokenizeBatchResponse(msgspec.Struct, frozen=True, kw_only=True):
    """`prompt` was a list: one entry per prompt."""

    tokens: list[list[int]]
    count: list[int]
    max_model_len: int


class DetokenizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[int | list[int]]  # token ids, or one list of them per text
    skip_special_tokens: bool = True


class DetokenizeResponse(msgspec.Struct, frozen=True, kw_only=True):
    text: str | list[str]
