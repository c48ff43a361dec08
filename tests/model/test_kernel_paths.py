"""The CUDA serving paths, run on CPU: Triton attention (prefill, mixed and decode kernels), the
static-buffer decode runner (bucket padding, the step's exact LoRA segments in static buffers)
and Triton LoRA over arena rows, all through TRITON_INTERPRET=1 in float32, against the reference
runner. Graph capture itself is GPU-only (tests/model/test_gpu.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import torch

from lorasrv.ids import AdapterId, BlockId, SeqId, StepId
from lorasrv.messages import AdapterRows, NewSeq, StepPlan
from lorasrv.model.cuda_graphs import DecodeLora, DecodeRunner, buckets_up_to
from lorasrv.model.lora_backend import AdapterInfo, make_lora_backend
from lorasrv.model.runner import ModelRunner
from tests.model.plan_driver import GREEDY, PlanDriver

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels on CPU need TRITON_INTERPRET=1 set before Python starts",
)

ADAPTERS = ("qv_r4", "all_r8_rslora", "mlp_r16_patterns")
# Odd prompt lengths around the page size (4), a one-token prompt, base and adapter rows.
ROWS: list[tuple[list[int], int | None]] = [
    ([5, 6, 7, 8, 9], None),
    (list(range(20, 33)), 0),
    ([17], 1),
    (list(range(100, 108)), 1),
    ([42, 43, 44], 2),
]
NEW_TOKENS = 9


def make_runner(base: Path, kernels: bool, **kwargs: object) -> ModelRunner:
    backend = "triton" if kernels else "torch"
    return ModelRunner(
        model_path=str(base),
        device="cpu",
        page_size=4,
        num_kv_pages=256,
        enable_lora=True,
        lora_max_rank=16,
        lora_target_modules=("all",),
        lora_backend=backend,
        attention_backend="triton" if kernels else "reference",
        **kwargs,  # type: ignore[arg-type]
    )


def load_adapters(driver: PlanDriver, adapter_dir: Callable[[str], Path]) -> None:
    load = driver.runner.make_adapter_loader()
    for adapter_id, name in enumerate(ADAPTERS):
        driver.add_adapter(adapter_id, load(str(adapter_dir(name))))


def make_driver(runner: ModelRunner, **kwargs: object) -> PlanDriver:
    return PlanDriver(runner, lora_rows=40, **kwargs)  # type: ignore[arg-type]


def generate(
    runner: ModelRunner, token_budget: int, adapter_dir: Callable[[str], Path]
) -> tuple[list[list[int]], PlanDriver]:
    driver = make_driver(runner, token_budget=token_budget, record_logits=True)
    load_adapters(driver, adapter_dir)
    prompts, adapters = [p for p, _ in ROWS], [a for _, a in ROWS]
    return driver.generate(prompts, adapters, NEW_TOKENS), driver


# chunked + mixed steps on the row kernels; one prefill step, then stacked (the hot A cache)
@pytest.mark.parametrize(("token_budget", "hot_rows"), [(7, 0), (64, None)])
def test_kernel_runner_matches_reference(
    checkpoint_dir: Callable[[str], Path],
    adapter_dir: Callable[[str], Path],
    token_budget: int,
    hot_rows: int | None,
) -> None:
    base = checkpoint_dir("llama")
    reference = make_runner(base, kernels=False, lora_hot_rows=0)  # torch, row ops
    kernels = make_runner(base, kernels=True, lora_hot_rows=hot_rows)
    assert kernels.decode is not None
    assert reference.decode is None
    expected, ref_driver = generate(reference, token_budget, adapter_dir)
    decode_steps = []
    run = kernels.decode.run
    kernels.decode.run = lambda plan, **kw: (
        decode_steps.append(len(plan.seq_ids)) or run(plan, **kw)
    )  # type: ignore[method-assign]
    tokens, driver = generate(kernels, token_budget, adapter_dir)
    assert tokens == expected
    assert 5 in decode_steps  # the static decode path ran, all rows in bucket 8
    for seq_id, logits in ref_driver.first_logits.items():
        torch.testing.assert_close(driver.first_logits[seq_id], logits, atol=1e-4, rtol=1e-4)
    assert kernels.lora is not None
    hot = kernels.lora.hot
    assert (hot is None) == (hot_rows == 0)
    if hot is not None:  # every decode step ran stacked; prefill and mixed steps the rows
        assert hot.num_steps >= NEW_TOKENS - 1
        assert hot.num_fills == 3


def test_decode_runner_padding_writes_no_kv(checkpoint_dir: Callable[[str], Path]) -> None:
    # 3 rows run in bucket 4: the padding row must not touch any page.
    runner = make_runner(checkpoint_dir("llama"), kernels=True, cuda_graph_max_batch_size=8)
    decode = runner.decode
    assert decode is not None
    assert decode.buckets == (1, 2, 4, 8)
    plan = StepPlan(
        step_id=StepId(0),
        new_seqs=tuple(NewSeq(seq_id=SeqId(i), params=GREEDY, prompt_ids=(1,)) for i in range(3)),
        seq_ids=(SeqId(0), SeqId(1), SeqId(2)),
        input_ids=(11, 12, 13),
        query_lens=(1, 1, 1),
        context_lens=(0, 5, 3),
        block_tables=((BlockId(7),), (BlockId(3), BlockId(9)), (BlockId(0),)),
        lora_adapters=(-1, -1, -1),
        sample_rows=(True, True, True),
    )
    assert plan.is_decode
    assert decode.can_run(plan)
    pages = runner.arena.kv  # [pages, layers, 2, page_size, kv_heads, head_dim]
    before = pages.clone()
    result = runner.step(plan)
    assert len(result.token_ids) == 3
    changed = (pages != before).transpose(1, 3).flatten(2).any(-1)  # [pages, page_size]
    written = {(int(p), int(s)) for p, s in changed.nonzero().tolist()}
    assert written == {(7, 0), (9, 1), (0, 3)}


def test_decode_runner_can_run() -> None:
    adapters = tuple(AdapterRows(AdapterId(i), tuple(range(10 * i, 10 * i + 4))) for i in range(3))

    def plan(indices: tuple[int, ...], query_lens: tuple[int, ...] | None = None) -> StepPlan:
        n = len(indices)
        return StepPlan(
            step_id=StepId(0),
            seq_ids=tuple(SeqId(i) for i in range(n)),
            input_ids=(1,) * sum(query_lens or (1,) * n),
            query_lens=query_lens or (1,) * n,
            context_lens=(3,) * n,
            block_tables=((BlockId(0),),) * n,
            lora_adapters=indices,
            adapters=adapters,
            sample_rows=(True,) * n,
        )

    decode = DecodeRunner.__new__(DecodeRunner)  # only the host-side checks, no model
    decode.buckets, decode.page_size, decode.max_pages = (1, 2, 4), 4, 2
    info = {AdapterId(i): AdapterInfo(4, 1.0) for i in range(3)}
    decode.lora = DecodeLora(make_lora_backend("torch", torch.device("cpu"), 4), info, 8)
    assert decode.can_run(plan((-1, 0, 0, 1)))
    assert not decode.can_run(plan((0, 1, 0, 1)))  # unsorted: 4 segments list 16 rows > 8
    assert not decode.can_run(plan((0, 1, 2)))  # 12 row entries > the buffers' 8
    assert not decode.can_run(plan((0, 1), (2, 1)))  # a prefill row
    assert not decode.can_run(plan((-1,) * 5))  # more rows than the largest bucket
    decode.lora = None
    assert decode.can_run(plan((-1, -1)))
    assert not decode.can_run(plan((0,)))  # adapter rows without LoRA: the eager path refuses


def test_buckets() -> None:
    assert buckets_up_to(50) == (1, 2, 4, 8, 16, 24, 32, 48, 50)
    assert buckets_up_to(1) == (1,)


def test_decode_path_without_lora_matches_reference(checkpoint_dir: Callable[[str], Path]) -> None:
    """No LoRA pool at all (zero segments): the static decode inputs must still pack right."""
    base = checkpoint_dir("llama")
    runners = [
        ModelRunner(
            model_path=str(base),
            device="cpu",
            page_size=4,
            num_kv_pages=128,
            attention_backend=attention,
            lora_backend=lora,
        )
        for attention, lora in (("reference", "torch"), ("triton", "triton"))
    ]
    assert runners[1].decode is not None
    prompts = [p for p, _ in ROWS]
    outputs = [PlanDriver(r, token_budget=64).generate(prompts, None, NEW_TOKENS) for r in runners]
    assert outputs[1] == outputs[0]


@pytest.mark.parametrize("kernels", [True, False])
def test_overlapped_steps_match_step_by_step(
    checkpoint_dir: Callable[[str], Path], adapter_dir: Callable[[str], Path], kernels: bool
) -> None:
    """Each step launched before the previous one's tokens are read, its continuing rows fed them
    from the device (the static decode path with kernels, the eager path without), gives the
    tokens of waiting for each step, with rows stopping at different steps."""
    base = checkpoint_dir("llama")
    prompts, adapters = [p for p, _ in ROWS], [a for _, a in ROWS]
    limits = [3, 11, 6, 14, 8]
    outputs, drivers = [], []
    for overlap in (False, True):
        runner = make_runner(base, kernels=kernels)
        assert (runner.decode is not None) == kernels
        driver = make_driver(runner, token_budget=64, overlap=overlap)
        load_adapters(driver, adapter_dir)
        outputs.append(driver.generate(prompts, adapters, limits))
        drivers.append(driver)
    assert outputs[1] == outputs[0]
    assert [len(t) for t in outputs[0]] == limits
    assert drivers[0].num_device_inputs == 0
    # every row after its first token, but for rows decoded when the host already had the token
    assert drivers[1].num_device_inputs >= sum(limits) - 2 * len(limits)


def test_a_device_input_must_follow_a_sampled_token(checkpoint_dir: Callable[[str], Path]) -> None:
    """A plan that feeds a row from the device before any step sampled for it is refused (the
    table would hold another sequence's token), on both paths."""
    runner = make_runner(checkpoint_dir("llama"), kernels=True, cuda_graph_max_batch_size=4)
    tables = ((BlockId(0), BlockId(1)),)
    new = (NewSeq(seq_id=SeqId(0), params=GREEDY, prompt_ids=(1, 2, 3)),)
    decode = StepPlan(
        step_id=StepId(0), new_seqs=new, seq_ids=(SeqId(0),), input_ids=(0,), query_lens=(1,),
        context_lens=(3,), block_tables=tables, lora_adapters=(-1,), sample_rows=(True,),
        device_inputs=(True,),
    )  # fmt: skip
    with pytest.raises(ValueError, match="no step launched since it was added sampled"):
        runner.step(decode)
    prefill = StepPlan(
        step_id=StepId(1), new_seqs=new, seq_ids=(SeqId(0),), input_ids=(1, 2, 3),
        query_lens=(3,), context_lens=(0,), block_tables=tables, lora_adapters=(-1,),
        sample_rows=(True,),
    )  # fmt: skip
    pending = runner.launch(prefill)
    token = runner.launch(msgspec.structs.replace(decode, new_seqs=())).result().token_ids
    on_host = msgspec.structs.replace(
        decode, new_seqs=(), input_ids=pending.result().token_ids, device_inputs=()
    )
    # the same row fed from the host gives the same token (its K/V rewritten identically)
    assert runner.step(on_host).token_ids == token


def test_upload_in_a_static_decode_step(
    checkpoint_dir: Callable[[str], Path], adapter_dir: Callable[[str], Path]
) -> None:
    """One-token prompts: the plan that uploads an adapter is itself a static decode step that
    reads it; an adapter uploaded ahead (a prefetch) is used by a later plan."""
    base = checkpoint_dir("llama")
    outputs = []
    uploading_decodes: list[int] = []
    for kernels in (True, False):
        runner = make_runner(base, kernels=kernels)
        if runner.decode is not None:
            run = runner.decode.run
            runner.decode.run = lambda plan, run=run, **kw: (
                uploading_decodes.append(len(plan.uploads)) or run(plan, **kw)
            )  # type: ignore[method-assign]
        driver = make_driver(runner)
        load = runner.make_adapter_loader()
        driver.add_adapter(0, load(str(adapter_dir(ADAPTERS[0]))))
        first = driver.generate([[5], [6]], [None, 0], 3)
        driver.add_adapter(1, load(str(adapter_dir(ADAPTERS[1]))))
        driver.add_adapter(2, load(str(adapter_dir(ADAPTERS[2]))))  # no row uses it next
        second = driver.generate([[7], [8], [9]], [None, 0, 1], 3)
        third = driver.generate([[10], [11]], [1, 2], 3)
        outputs.append(first + second + third)
    assert outputs[0] == outputs[1]
    assert [n for n in uploading_decodes if n] == [1, 2]  # both uploads rode decode steps
