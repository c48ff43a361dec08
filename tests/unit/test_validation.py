"""Request checks: each bad value is a BadRequest that names the field."""

from __future__ import annotations

from typing import Any

import pytest

from lorasrv.engine.requests import normalize_generate
from lorasrv.engine.validation import check_sampling, to_sampling_params
from lorasrv.errors import BadRequest


def check(**raw: Any) -> None:
    check_sampling(to_sampling_params(raw), vocab_size=100, context_length=4096)


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
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
        ({"max_new_tokens": "ten"}, "max_new_tokens"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_sampling_values_name_the_field(raw: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequest, match=named):
        check(**raw)


def test_good_values_pass_and_stop_string_becomes_a_list() -> None:
    params = to_sampling_params({"stop": "###", "temperature": 0, "top_k": 1, "seed": 3})
    assert params.stop == ("###",)
    check_sampling(params, vocab_size=100, context_length=4096)


def test_batch_shapes() -> None:
    batch = normalize_generate(text=["a", "b"], lora_path=["x", None], sampling_params={})
    assert batch.is_batch
    assert [i.lora_name for i in batch.items] == ["x", None]
    single = normalize_generate(input_ids=[1, 2, 3])
    assert not single.is_batch
    assert single.items[0].input_ids == [1, 2, 3]
    ids_batch = normalize_generate(input_ids=[[1], [2, 3]], lora_path="x")
    assert [i.lora_name for i in ids_batch.items] == ["x", "x"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ["a", "b"], "lora_path": ["x"]}, "lora_path has 1 entries for 2"),
        ({"text": ["a"], "sampling_params": [{}, {}]}, "sampling_params has 2 entries"),
        ({}, "exactly one of text or input_ids"),
        ({"text": "a", "input_ids": [1]}, "exactly one of text or input_ids"),
        ({"text": []}, "non-empty list"),
        ({"input_ids": []}, "non-empty list"),
        ({"input_ids": [[1], "x"]}, "input_ids"),
        ({"text": "a", "lora_path": 5}, "lora_path must be"),
        ({"text": "a", "colour": "red"}, "unknown field"),
    ],
)
def test_bad_shapes(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        normalize_generate(**kwargs)


def test_return_logprob_maps_into_sampling_params() -> None:
    batch = normalize_generate(text="a", return_logprob=True, top_logprobs_num=3)
    assert batch.want_logprobs
    assert batch.items[0].params.logprobs
    assert batch.items[0].params.top_logprobs == 3


@pytest.mark.parametrize("text", ["", ["ok", ""]])
def test_empty_text_is_refused(text: str | list[str]) -> None:
    with pytest.raises(BadRequest, match="non-empty"):
        normalize_generate(text=text)
