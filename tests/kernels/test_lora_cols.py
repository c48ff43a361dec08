"""The `*_cols` ops: the expand and the fused gate/up activation reading each segment's rank
columns from a stacked v (a `[W; A_hot]` GEMM's output: base columns, then S blocks of H hot
rows) at a per-segment column offset. The reference against the plain row ops on the same
numbers; the Triton ops against the reference, with every column no segment names NaN.

CPU runs need TRITON_INTERPRET=1 (float32); `-m gpu` adds bf16 v and B at Llama-3-8B shapes and
a CUDA-graph replay on static buffers.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from lorasrv_kernels import (
    LoraBatchBuffers,
    LoraBatchInfo,
    lora_expand_cols,
    lora_reference,
    lora_silu_mul_cols,
    prepare_lora_batch_info,
)

from tests.kernels.lora_rows_cases import POPULARITY, RowsCase, grid_case, lora_token_mask
from tests.kernels.marks import TRITON_DEVICE, needs_cuda, needs_triton
from tests.kernels.test_lora_rows import LLAMA3_8B, MODULES, assert_close

BASE_COLS = 5  # stand-in for the base output's columns before the hot block


class Stacked:
    """A RowsCase's shrink laid out as a stacked GEMM would write it: each segment's adapter at
    its own hot rows (contiguous, anywhere in [0, hot)); every other entry NaN."""

    def __init__(self, case: RowsCase, hot: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        num_slices = len(case.slice_offsets) - 1
        self.hot = hot
        ranks = [len(rows) for rows in case.seg_rows]
        assert sum(ranks) <= hot, "the case's adapters must fit the hot rows together"
        # shuffled placement with holes: segment order is not hot-row order
        order = list(range(len(ranks)))
        rng.shuffle(order)
        spare, start, cols = hot - sum(ranks), 0, [0] * len(ranks)
        for seg in order:
            gap = rng.randint(0, spare)
            spare -= gap
            cols[seg] = start + gap
            start += gap + ranks[seg]
        self.cols = cols
        self.info: LoraBatchInfo = prepare_lora_batch_info(
            case.seg_lens, case.seg_rows, case.info.seg_scaling.tolist(),
            max_rank=case.info.max_rank, device=case.x.device, seg_v_col=cols,
        )  # fmt: skip
        self.v_rows = lora_reference.lora_shrink(case.x, case.a_rows, case.info, num_slices)
        num_tokens, max_rank = case.x.shape[0], case.info.max_rank
        wide = torch.full((num_tokens, BASE_COLS + num_slices * hot), math.nan)
        token = 0
        for seg, length in enumerate(case.seg_lens):
            for j in range(num_slices):
                src = self.v_rows[token : token + length, j * max_rank : j * max_rank + ranks[seg]]
                dst = BASE_COLS + j * hot + cols[seg]
                wide[token : token + length, dst : dst + ranks[seg]] = src.cpu()
            token += length
        self.wide = wide.to(device=case.x.device)
        self.v = self.wide[:, BASE_COLS:]  # a column window, as the GEMM output's


def test_seg_v_col_is_packed_and_checked() -> None:
    info = prepare_lora_batch_info([2, 3], [[], [4, 5]], [0.0, 1.0], max_rank=4, seg_v_col=[0, 7])
    assert info.seg_v_col[:2].tolist() == [0, 7]
    assert prepare_lora_batch_info([2], [[1]], [1.0], max_rank=4).seg_v_col.tolist() == [0]
    with pytest.raises(ValueError, match="seg_v_col"):
        prepare_lora_batch_info([2], [[1]], [1.0], max_rank=4, seg_v_col=[0, 1])
    with pytest.raises(ValueError, match="seg_v_col"):
        prepare_lora_batch_info([2], [[1]], [1.0], max_rank=4, seg_v_col=[-1])


@pytest.mark.parametrize("popularity", POPULARITY)
def test_reference_cols_equal_the_row_ops(popularity: str) -> None:
    case = grid_case(popularity, 9, "mixed", in_features=72, slice_sizes=(72, 24, 24))
    stacked = Stacked(case, hot=128)
    expected = case.y.clone()
    lora_reference.lora_expand(stacked.v_rows, case.bt_rows, expected, case.info,
                               case.slice_offsets)  # fmt: skip
    y = case.y.clone()
    lora_reference.lora_expand_cols(stacked.v, case.bt_rows, y, stacked.info, case.slice_offsets,
                                    stacked.hot)  # fmt: skip
    assert torch.equal(y, expected)
    assert bool(torch.isfinite(y).all()), "a NaN column or arena row leaked"


def check_cols(case: RowsCase, hot: int | None, dtype: torch.dtype, v_dtype: torch.dtype) -> None:
    """Triton against the reference on the same (possibly rounded) v; base rows untouched.
    `hot`: the hot rows (None: the case's ranks and 17 spare)."""
    hot = hot or sum(len(rows) for rows in case.seg_rows) + 17
    stacked = Stacked(case, hot)
    v = stacked.v.to(v_dtype)
    y_ref = case.y.clone()
    lora_reference.lora_expand_cols(v, case.bt_rows, y_ref, stacked.info, case.slice_offsets, hot)
    assert bool(torch.isfinite(y_ref).all())
    y = case.y.clone()
    lora_expand_cols(v, case.bt_rows, y, stacked.info, case.slice_offsets, hot)
    assert_close(y, y_ref, dtype)
    assert bool(torch.isfinite(y).all()), "a NaN column or arena row leaked"
    base = ~lora_token_mask(case)
    assert torch.equal(y.cpu()[base], case.y.cpu()[base]), "expand wrote base rows"
    if len(case.slice_offsets) == 3:
        expected = lora_reference.lora_silu_mul_cols(case.y, v, case.bt_rows, stacked.info, hot)
        out = lora_silu_mul_cols(case.y, v, case.bt_rows, stacked.info, hot)
        assert_close(out, expected, dtype)
        assert bool(torch.isfinite(out).all())


@needs_triton
@pytest.mark.parametrize("num_tokens", [1, 6, 37])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_triton_cols_grid(popularity: str, num_tokens: int) -> None:
    names = list(MODULES)
    module = names[(POPULARITY.index(popularity) + num_tokens) % len(names)]
    in_features, slices = MODULES[module]
    case = grid_case(popularity, num_tokens, "mixed", in_features=in_features,
                     slice_sizes=slices, device=TRITON_DEVICE)  # fmt: skip
    check_cols(case, None, torch.float32, torch.float32)


@needs_triton
def test_triton_cols_exactly_full_hot_rows() -> None:
    # the adapters fill every hot row: the last segment's block ends at the slice's last column
    case = grid_case("uniform", 12, "uniform16", in_features=72, slice_sizes=(130, 130),
                     num_adapters=4, device=TRITON_DEVICE)  # fmt: skip
    hot = sum(len(rows) for rows in case.seg_rows)
    check_cols(case, hot, torch.float32, torch.float32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("popularity", ["uniform", "zipf", "identical"])
@pytest.mark.parametrize("module", LLAMA3_8B)
def test_gpu_cols_llama3_8b(module: str, popularity: str) -> None:
    in_features, slices = LLAMA3_8B[module]
    case = grid_case(popularity, 64, "uniform16", in_features=in_features, slice_sizes=slices,
                     num_adapters=8, dtype=torch.bfloat16, device="cuda")  # fmt: skip
    check_cols(case, 128, torch.bfloat16, torch.bfloat16)  # a GEMM's bf16 output
    check_cols(case, 128, torch.bfloat16, torch.float32)


@pytest.mark.gpu
@needs_cuda
def test_gpu_cols_graph_replays_new_placements() -> None:
    # captured once on static buffers; each replay follows the last fill's columns
    hot = 128
    buffers = LoraBatchBuffers(max_tokens=64, max_segments=64, max_row_entries=64 * 16,
                               max_rank=16, device=torch.device("cuda"))  # fmt: skip
    info = buffers.info(max_tokens=64)
    case = grid_case("uniform", 64, "uniform16", in_features=4096, slice_sizes=(4096, 1024, 1024),
                     num_adapters=8, dtype=torch.bfloat16, device="cuda")  # fmt: skip
    lens = case.seg_lens
    v = torch.zeros(64, 3 * hot, dtype=torch.bfloat16, device="cuda")
    y = torch.zeros(64, 6144, dtype=torch.bfloat16, device="cuda")
    lora_expand_cols(v, case.bt_rows, y, info, case.slice_offsets, hot)  # compile off capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_expand_cols(v, case.bt_rows, y, info, case.slice_offsets, hot)
    for seed in range(3):
        stacked = Stacked(case, hot, seed=seed)
        buffers.fill(lens, case.seg_rows, case.info.seg_scaling.tolist(), stacked.cols)
        v.copy_(stacked.v)  # NaN in every column no segment names
        y.copy_(case.y)
        graph.replay()
        expected = case.y.clone()
        lora_reference.lora_expand_cols(v, case.bt_rows, expected, stacked.info,
                                        case.slice_offsets, hot)  # fmt: skip
        torch.testing.assert_close(y, expected, atol=3e-2, rtol=2e-2)
