"""Request checks: each bad value is a BadRequest that names the field; one function checks every
submission, whatever wire format it came in."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from lorasrv.engine.requests import Submission
from lorasrv.engine.validation import EMPTY_PROMPT, Limits, check_submission
from lorasrv.errors import BadRequest, PromptTooLong
from lorasrv.messages import ChatMessage, SamplingParams

LIMITS = Limits(vocab_size=100, context_length=4096, lora_enabled=True, max_token_chars=8)


def check(**params: Any) -> None:
    check_submission(Submission(text="hi", params=msgspec.convert(params, SamplingParams)), LIMITS)


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": 3.0}, "frequency_penalty"),
        ({"presence_penalty": -3.0}, "presence_penalty"),
        ({"stop_token_ids": [100]}, "stop_token_ids"),
        ({"stop": [""]}, "stop"),
        ({"top_logprobs": 99}, "top_logprobs"),
    ],
)
def test_bad_sampling_values_name_the_field(raw: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequest, match=named):
        check(**raw)


def test_good_values_pass() -> None:
    check(stop=["###"], temperature=0, top_k=1, seed=3, max_new_tokens=4096)


@pytest.mark.parametrize(
    ("submission", "message"),
    [
        (Submission(), "exactly one of text, input_ids or messages"),
        (Submission(text="a", input_ids=(1,)), "exactly one of"),
        (Submission(text=""), EMPTY_PROMPT),
        (Submission(input_ids=()), EMPTY_PROMPT),
        (Submission(messages=()), "messages is empty"),
        (Submission(input_ids=(1, 100)), r"input_ids: token id 100 is outside .*\[0, 100\)"),
        (Submission(input_ids=(-1,)), "token id -1"),
    ],
)
def test_bad_prompts(submission: Submission, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        check_submission(submission, LIMITS)


def test_good_prompts() -> None:
    for submission in (
        Submission(text="a"),
        Submission(input_ids=(0, 99)),
        Submission(messages=(ChatMessage(role="user", content=""),)),
    ):
        check_submission(submission, LIMITS)


def test_an_adapter_with_lora_off_names_it_and_the_flag() -> None:
    off = LIMITS._replace(lora_enabled=False)
    check_submission(Submission(text="a"), off)
    with pytest.raises(BadRequest, match=r"adapter 'x' requested, .*--enable-lora"):
        check_submission(Submission(text="a", lora_name="x"), off)


def test_prompt_size_is_bounded_before_tokenizing() -> None:
    params = SamplingParams()
    fits = "x" * (4096 * 8)  # 8 characters per token at most: this may still fit
    check_submission(Submission(text=fits, params=params), LIMITS)
    with pytest.raises(PromptTooLong, match="32769 characters; at most 32768 can fit"):
        check_submission(Submission(text=fits + "x", params=params), LIMITS)
    chat = [ChatMessage(role="user", content=fits[:20000]), ChatMessage(role="user", content=fits)]
    with pytest.raises(PromptTooLong, match="52768 characters"):
        check_submission(Submission(messages=chat, params=params), LIMITS)
    with pytest.raises(PromptTooLong, match="4096 tokens; the context length is 4096"):
        check_submission(Submission(input_ids=[1] * 4096, params=params), LIMITS)
