"""What every message is built from: the tagged Struct base, sampling parameters, chat messages
and token logprobs."""

import msgspec


class Msg(msgspec.Struct, frozen=True, tag=True):
    """Immutable, tagged with the class name. Subclasses add kw_only=True (not inherited)."""


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """SGLang's sampling_params. Field checks beyond types live in `engine.validation`."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = disabled
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    skip_special_tokens: bool = True
    logprobs: bool = False  # return the sampled token's logprob
    top_logprobs: int = 0  # and this many alternatives per position


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    content: str


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    logprob: float
