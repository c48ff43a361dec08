"""The arena and the rows in it, as plain tensors on CPU: where pages and rows lie and what they
overlay, the row layout and the packing of host copies, copies into non-contiguous rows, the
uploader's checks, and a plan's LoRA segments."""

from __future__ import annotations

import pytest
import torch

from lorasrv.config import SUPPORTED_LORA_MODULES
from lorasrv.ids import AdapterId, BlockId, SeqId, StepId
from lorasrv.messages import AdapterRows, StepPlan
from lorasrv.model.arch import ModelArch, parse_arch
from lorasrv.model.arena import Arena, ArenaGeometry, KvGeometry
from lorasrv.model.attention import KvCache
from lorasrv.model.lora_backend import AdapterInfo, lora_segments
from lorasrv.model.lora_layout import (
    AdapterWeights,
    LoraModuleWeights,
    pack_rows,
    pool_module_shapes,
    row_layout,
    row_runs,
    unpack_module,
)
from lorasrv.model.lora_pool import LoraPool
from lorasrv.model.uploads import Uploader

KV = KvGeometry(num_layers=2, page_size=4, num_kv_heads=2, head_dim=8)  # 256 elements a page


def tiny_arch() -> ModelArch:
    return parse_arch({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6,
        "intermediate_size": 36, "vocab_size": 50,
    })  # fmt: skip


def test_geometry_puts_rows_at_the_top() -> None:
    geometry = ArenaGeometry(num_pages=10, page_elems=256, row_elems=600, element_size=2)
    assert geometry.max_rows == 4  # 2560 // 600
    assert geometry.rows_offset == 2560 - 4 * 600 == 160
    assert geometry.row_bytes == 1200
    assert geometry.page_bytes == 512
    assert list(geometry.pages_of_row(0)) == [0, 1, 2]  # elements 160..759
    assert list(geometry.pages_of_row(3)) == [7, 8, 9]  # elements 1960..2559, the last one
    no_lora = ArenaGeometry(num_pages=10, page_elems=256, row_elems=0, element_size=2)
    assert no_lora.max_rows == 0


def test_pages_and_rows_share_the_memory() -> None:
    arena = Arena(KV, num_pages=10, row_elems=600, dtype=torch.float32, device=torch.device("cpu"))
    assert arena.rows is not None
    cache = KvCache(arena)
    k, _ = cache.layer(1)
    assert k.shape == (10, 4, 2, 8)
    assert k.stride(0) == 256  # one page spans both layers' K and V
    k[3, 2] = 1.0  # layer 1's K of page 3, slot 2
    assert bool((arena.kv[3, 1, 0, 2] == 1).all())
    arena.buffer.zero_()
    arena.rows[3] = 7.0
    touched = (arena.kv != 0).flatten(1).any(1)  # [pages]
    assert touched.nonzero().flatten().tolist() == list(arena.geometry.pages_of_row(3))


def random_weights(arch: ModelArch, rank: int, modules: tuple[str, ...]) -> AdapterWeights:
    gen = torch.Generator().manual_seed(rank)
    shapes = pool_module_shapes(arch)
    ins = {name: (shape.num_slices * rank, shape.in_features) for name, shape in shapes.items()}
    return AdapterWeights(
        rank=rank,
        scaling=0.25,
        modules={
            (layer, name): LoraModuleWeights(
                a=torch.randn(*ins[name], generator=gen),
                b=torch.randn(shapes[name].out_features, rank, generator=gen),
            )
            for layer in range(arch.num_layers)
            for name in modules
        },
        target_modules=("q_proj", "down_proj"),
        dtype=torch.float32,
    )  # fmt: skip


def test_row_layout_and_packing_round_trip() -> None:
    arch = tiny_arch()
    layout = row_layout(arch, SUPPORTED_LORA_MODULES)
    offsets = [o for m in layout.modules.values() for o in (m.a_offset, m.b_offset)]
    assert all(o % 8 == 0 for o in offsets), "parts start 16-byte aligned in half precision"
    assert offsets == sorted(offsets)
    assert len(layout.modules) == 2 * 4
    weights = random_weights(arch, 3, ("qkv_proj", "down_proj"))
    host = pack_rows(weights, layout, pin_memory=False)
    assert host.rows.shape == (3, layout.row_elems)
    assert host.num_bytes == 3 * layout.row_elems * 4
    for key, module in weights.modules.items():
        got = unpack_module(host, layout.modules[key])
        assert torch.equal(got.a, module.a)
        assert torch.equal(got.b, module.b)
    untrained = layout.modules[1, "gate_up_proj"]
    assert not host.rows[:, untrained.a_offset : untrained.b_offset + untrained.b_elems].any()
    qv = row_layout(arch, ("q_proj", "v_proj"))  # only the fused module that exists
    assert {name for _, name in qv.modules} == {"qkv_proj"}
    with pytest.raises(ValueError, match="no place"):
        pack_rows(weights, qv, pin_memory=False)


def test_row_runs() -> None:
    assert row_runs([7, 8, 9, 2, 3, 11]) == [(0, 7, 3), (3, 2, 2), (5, 11, 1)]
    assert row_runs([5, 4, 3]) == [(0, 5, 1), (1, 4, 1), (2, 3, 1)]
    assert row_runs([]) == []


def make_pool(max_rows: int = 12) -> LoraPool:
    layout = row_layout(tiny_arch(), SUPPORTED_LORA_MODULES)
    return LoraPool(torch.zeros(max_rows, layout.row_elems), layout)


def test_write_into_non_contiguous_rows() -> None:
    pool = make_pool()
    host = torch.randn(5, pool.layout.row_elems)
    rows = [9, 2, 3, 11, 0]
    pool.write(rows, host)
    for i, row in enumerate(rows):
        assert torch.equal(pool.rows[row], host[i])
    others = [r for r in range(pool.max_rows) if r not in rows]
    assert not pool.rows[others].any()
    qkv = pool.module(0, "qkv_proj")
    assert qkv is not None
    assert qkv.a_rows.shape == (12, 3 * 24)
    assert qkv.a_rows.stride(0) == pool.layout.row_elems  # a view of the rows, never a copy
    assert torch.equal(qkv.a_rows[9], host[0, : 3 * 24])
    with pytest.raises(ValueError, match="distinct"):
        pool.write([1, 1], host[:2])
    with pytest.raises(ValueError, match="outside"):
        pool.write([12], host[:1])
    with pytest.raises(ValueError, match="rank"):
        pool.write([1, 2], host)  # fewer rows than the copy


def test_uploader_checks_what_plans_ask() -> None:
    pool = make_pool()
    uploader = Uploader(pool, torch.device("cpu"))
    arch = tiny_arch()
    host = pack_rows(random_weights(arch, 2, ("o_proj",)), pool.layout, pin_memory=False)
    with pytest.raises(TypeError, match="host copy"):
        uploader.add(AdapterId(1), "not rows", 2, 0.5)
    with pytest.raises(ValueError, match="do not fit"):
        uploader.add(AdapterId(1), host, 1, 0.5)  # fewer rows than the copy holds
    uploader.add(AdapterId(1), host, 2, 0.5)
    uploader.upload([AdapterRows(AdapterId(1), (10, 4))])
    assert torch.equal(pool.rows[4], host.rows[1])
    with pytest.raises(ValueError, match="1 rows for rank 2"):
        uploader.upload([AdapterRows(AdapterId(1), (5,))])
    with pytest.raises(ValueError, match="no host copy"):
        uploader.upload([AdapterRows(AdapterId(2), (5,))])
    uploader.drop(AdapterId(1))
    with pytest.raises(ValueError, match="no host copy"):
        uploader.upload([AdapterRows(AdapterId(1), (10, 4))])
    uploader.check_rows([AdapterRows(AdapterId(1), (10, 4))])  # rank and scaling stay known
    with pytest.raises(ValueError, match="never sent"):
        uploader.check_rows([AdapterRows(AdapterId(3), (1,))])
    with pytest.raises(ValueError, match="rows for rank"):
        uploader.check_rows([AdapterRows(AdapterId(1), (1, 2, 3))])
    with pytest.raises(ValueError, match="outside"):
        uploader.check_rows([AdapterRows(AdapterId(1), (1, 99))])


def test_rows_past_the_copys_rank_are_zeroed() -> None:
    """An adapter counted at a higher rank than its tensors (its config's r, say) gets the
    extra rows zeroed, whatever they held: the kernels read every row a segment lists."""
    pool = make_pool()
    pool.rows.fill_(float("nan"))
    uploader = Uploader(pool, torch.device("cpu"))
    host = pack_rows(random_weights(tiny_arch(), 2, ("o_proj",)), pool.layout, pin_memory=False)
    uploader.add(AdapterId(1), host, 4, 9.0)  # 9.0: not what B was folded for
    assert uploader.info[AdapterId(1)] == AdapterInfo(4, host.scaling)
    uploader.upload([AdapterRows(AdapterId(1), (8, 3, 5, 6))])
    assert torch.equal(pool.rows[[8, 3]], host.rows)
    assert not pool.rows[[5, 6]].any()
    assert bool(pool.rows[[0, 1, 2, 4, 7]].isnan().all())  # nothing else was touched


def plan(lora_adapters: tuple[int, ...], query_lens: tuple[int, ...]) -> StepPlan:
    n = len(lora_adapters)
    return StepPlan(
        step_id=StepId(0),
        seq_ids=tuple(SeqId(i) for i in range(n)),
        input_ids=(1,) * sum(query_lens),
        query_lens=query_lens,
        context_lens=(0,) * n,
        block_tables=((BlockId(0),),) * n,
        lora_adapters=lora_adapters,
        adapters=(AdapterRows(AdapterId(5), (3, 9)), AdapterRows(AdapterId(6), (1,))),
        sample_rows=(True,) * n,
    )


def test_lora_segments_cover_every_row() -> None:
    info = {AdapterId(5): AdapterInfo(2, 0.5), AdapterId(6): AdapterInfo(1, 2.0)}
    sorted_plan = plan((-1, -1, 0, 0, 1), (3, 1, 2, 1, 4))
    segments = lora_segments(sorted_plan, sorted_plan.query_lens, info)
    assert segments is not None
    assert segments.seg_lens == [4, 3, 4]
    assert segments.seg_rows == [(), (3, 9), (1,)]
    assert segments.seg_scaling == [0.0, 0.5, 2.0]
    assert segments.num_row_entries == 3
    unsorted = plan((0, -1, 0), (1, 1, 1))
    segments = lora_segments(unsorted, unsorted.query_lens, info)
    assert segments is not None
    assert segments.seg_lens == [1, 1, 1]  # correct, with one segment more
    assert segments.seg_rows == [(3, 9), (), (3, 9)]
    base = plan((-1, -1), (2, 2))
    assert lora_segments(base, base.query_lens, info) is None
