"""SGLang's /generate format as pure functions: body -> Submissions (prompts, per-item lists,
logprob fields, SGLang's `n` and request ids), RequestResult -> the result dict."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from lorasrv.engine.results import RequestResult
from lorasrv.errors import BadRequest
from lorasrv.http import sglang
from lorasrv.http.schemas import GenerateRequest
from lorasrv.messages import TokenLogprob


def parse(**body: Any) -> sglang.GenerateBatch:
    return sglang.parse_generate(msgspec.convert(body, GenerateRequest))


def test_batch_shapes() -> None:
    batch = parse(text=["a", "b"], lora_path=["x", None], sampling_params={})
    assert batch.is_batch
    assert [(s.text, s.lora_name) for s in batch.submissions] == [("a", "x"), ("b", None)]
    single = parse(input_ids=[1, 2, 3])
    assert not single.is_batch
    assert single.submissions[0].input_ids == (1, 2, 3)
    ids_batch = parse(input_ids=[[1], [2, 3]], lora_path="x")
    assert [(s.input_ids, s.lora_name) for s in ids_batch.submissions] == [
        ((1,), "x"),
        ((2, 3), "x"),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": ["a", "b"], "lora_path": ["x"]}, "lora_path has 1 entries for 2"),
        ({"text": ["a"], "sampling_params": [{}, {}]}, "sampling_params has 2 entries"),
        ({}, "exactly one of text or input_ids"),
        ({"text": "a", "input_ids": [1]}, "exactly one of text or input_ids"),
        ({"text": []}, "text: an empty list"),
        ({"input_ids": [[1], 2]}, "not a mix"),
        ({"text": "a", "logprob_start_len": 0}, "logprob_start_len"),
        ({"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 3}]}, "n must be the same"),
        ({"text": "a", "sampling_params": {"n": 129}}, r"n must be in \[1, 128\]"),
    ],
)
def test_bad_shapes(body: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse(**body)


def test_return_logprob_maps_into_sampling_params() -> None:
    batch = parse(text="a", return_logprob=True, top_logprobs_num=3)
    params = batch.submissions[0].params
    assert (params.logprobs, params.top_logprobs) == (True, 3)
    assert batch.want_logprobs == [True]


def test_sampling_params_defaults_stop_and_seed_names() -> None:
    params = parse(text="a", sampling_params={"stop": "###", "temperature": None}).submissions[0]
    assert params.params.stop == ("###",)
    assert params.params.temperature == 1.0  # null: the engine's default, as SGLang
    assert parse(text="a", sampling_params={"sampling_seed": 5}).submissions[0].params.seed == 5


def test_n_samples_each_prompt_with_its_own_seed_and_id() -> None:
    """SGLang's order: prompt p's samples are outputs p*n .. p*n+n-1."""
    batch = parse(text=["p", "q"], rid=["r", "s"], lora_path=["x", None],
                  sampling_params={"n": 2, "seed": 10})  # fmt: skip
    assert batch.is_batch
    got = [(s.text, s.lora_name, s.request_id, s.params.seed) for s in batch.submissions]
    assert got == [
        ("p", "x", "r_0", 10), ("p", "x", "r_1", 11), ("q", None, "s_0", 10),
        ("q", None, "s_1", 11),
    ]  # fmt: skip
    single = parse(text="p", rid="r", sampling_params={"n": 3})
    assert single.is_batch  # n > 1 answers a list, as SGLang does
    assert [s.request_id for s in single.submissions] == ["r_0", "r_1", "r_2"]
    assert {s.params.seed for s in single.submissions} == {None}  # unseeded: independent draws
    assert [s.request_id for s in parse(text=["p", "q"], rid="b").submissions] == ["b_0", "b_1"]


def test_generate_item() -> None:
    top = (TokenLogprob(5, -0.1), TokenLogprob(6, -2.0))
    result = RequestResult(
        request_id="r", text="hey", token_ids=(5, 7), logprobs=(-0.1, -0.3),
        top_logprobs=(top,), finish_reason="stop", matched_stop="!", prompt_tokens=4,
        completion_tokens=2,
    )  # fmt: skip
    item = sglang.generate_item(result, 0.0, want_logprobs=True, index=3)
    assert (item["text"], item["output_ids"], item["index"]) == ("hey", [5, 7], 3)
    meta = item["meta_info"]
    assert meta["finish_reason"] == {"type": "stop", "matched": "!"}
    assert (meta["id"], meta["prompt_tokens"], meta["completion_tokens"]) == ("r", 4, 2)
    assert meta["output_token_logprobs"] == [[-0.1, 5, [[-0.1, 5], [-2.0, 6]]], [-0.3, 7, []]]
    plain = sglang.generate_item(result, 0.0, want_logprobs=False)
    assert "output_token_logprobs" not in plain["meta_info"]
    assert "index" not in plain
    length = msgspec.structs.replace(result, finish_reason="length")
    assert sglang.generate_item(length, 0.0, want_logprobs=False)["meta_info"]["finish_reason"] == {
        "type": "length",
        "length": 2,
    }
