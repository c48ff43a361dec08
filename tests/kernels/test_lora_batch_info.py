"""LoraBatchInfo's host builder: segment fields, tile lists, capacity bounds and errors, and the
static buffers a CUDA graph replays (refilled per step, read through one bucket's bounds)."""

from __future__ import annotations

import random

import pytest
import torch
from lorasrv_kernels import (
    LoraBatchBuffers,
    LoraBatchLayout,
    lora_apply,
    lora_reference,
    prepare_lora_batch_info,
)
from lorasrv_kernels.batch_info import SHRINK_BLOCK_R

from tests.kernels.lora_rows_cases import make_rows_case
from tests.kernels.marks import TRITON_DEVICE, needs_cuda, needs_triton


def test_fields_and_tiles() -> None:
    # base, rank 20 over 3 tokens, an empty rank-4 segment, rank 4 over 18 tokens
    rows = [[], list(range(100, 120)), [7, 8, 9, 10], [3, 1, 2, 0]]
    info = prepare_lora_batch_info([2, 3, 0, 18], rows, [9.0, 0.5, 1.0, 2.0], max_rank=32,
                                   block_m=16)  # fmt: skip
    assert info.seg_indptr.tolist() == [0, 2, 5, 5, 23]
    assert info.seg_rank.tolist() == [0, 20, 4, 4]
    assert info.seg_row_start.tolist() == [0, 0, 20, 24]
    assert info.seg_scaling.tolist() == [9.0, 0.5, 1.0, 2.0]
    assert info.row_index.tolist() == [*range(100, 120), 7, 8, 9, 10, 3, 1, 2, 0]
    # LoRA token tiles first (segment 3 spans two 16-row tiles), then the base segment's
    assert info.token_tiles.tolist() == [[1, 2], [3, 5], [3, 21], [0, 0]]
    assert info.shrink_tiles.tolist() == [[1, 2, 0], [1, 2, 16], [3, 5, 0], [3, 21, 0]]
    assert info.counts.tolist() == [4, 4, 3, 4]
    assert (info.max_shrink_tiles, info.max_lora_tiles, info.max_token_tiles) == (4, 3, 4)
    assert int(info.counters.abs().sum()) == 0


@pytest.mark.parametrize(
    ("seg_lens", "seg_rows", "message"),
    [
        ([1, 2], [[0]], "one entry per segment"),
        ([-1], [[0]], "non-negative"),
        ([1], [list(range(9))], "max_rank 8"),
    ],
)
def test_bad_input_is_refused(seg_lens: list[int], seg_rows: list[list[int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        prepare_lora_batch_info(seg_lens, seg_rows, [1.0] * len(seg_rows), max_rank=8)


def test_buffers_refuse_steps_over_capacity() -> None:
    buffers = LoraBatchBuffers(max_tokens=8, max_segments=3, max_row_entries=12, max_rank=8,
                               device=torch.device("cpu"))  # fmt: skip
    with pytest.raises(ValueError, match="tokens > capacity"):
        buffers.fill([9], [[0]], [1.0])
    with pytest.raises(ValueError, match="segments > capacity"):
        buffers.fill([1, 1, 1, 1], [[0]] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match="row entries > capacity"):
        buffers.fill([4, 4], [list(range(8)), list(range(8, 16))], [1.0] * 2)
    buffers.fill([4, 4], [list(range(8)), list(range(8, 12))], [1.0] * 2)  # exactly full


def random_step(rng: random.Random, max_tokens: int, max_segments: int, max_rank: int
                ) -> tuple[list[int], list[list[int]]]:  # fmt: skip
    num_tokens = rng.randint(0, max_tokens)
    num_segments = rng.randint(min(1, num_tokens), max(1, min(max_segments, num_tokens)))
    cuts = sorted(rng.randint(0, num_tokens) for _ in range(num_segments - 1))
    lens = [b - a for a, b in zip([0, *cuts], [*cuts, num_tokens], strict=True)]
    rows = [list(range(rng.choice([0, 1, 8, 16, max_rank]))) for _ in lens]
    return lens, rows


@pytest.mark.parametrize("block_m", [16, 64])
def test_bucket_bounds_hold_for_any_step(block_m: int) -> None:
    # every step a bucket can get fits the layout, and its tiles within the bucket's bounds
    rng = random.Random(block_m)
    for _ in range(300):
        max_tokens, max_segments = rng.choice([1, 7, 64, 256]), rng.choice([1, 4, 65, 300])
        layout = LoraBatchLayout.for_capacity(max_tokens=max_tokens, max_segments=max_segments,
                                              max_row_entries=10**6, max_rank=64,
                                              block_m=block_m)  # fmt: skip
        lens, rows = random_step(rng, max_tokens, layout.max_segments, 64)
        info = prepare_lora_batch_info(lens, rows, [1.0] * len(lens), max_rank=64,
                                       block_m=block_m)  # fmt: skip
        assert info.max_token_tiles <= layout.max_token_tiles
        assert info.max_shrink_tiles <= layout.max_shrink_tiles
        assert layout.max_shrink_tiles <= layout.max_token_tiles * -(-64 // SHRINK_BLOCK_R)


@needs_triton
def test_buffers_replay_with_new_contents() -> None:
    # One set of static tensors, read through a bucket's bounds, serves steps of different
    # segments, ranks and rows (what a captured graph sees between replays).
    device = torch.device(TRITON_DEVICE)
    buffers = LoraBatchBuffers(max_tokens=16, max_segments=8, max_row_entries=64, max_rank=20,
                               device=device)  # fmt: skip
    info = buffers.info(max_tokens=8)
    assert info.max_token_tiles <= 8
    steps = [([3, 1, 4], [20, 0, 8]), ([1, 1, 1, 1, 1, 1, 2], [4, 8, 0, 20, 20, 1, 0])]
    for seed, (lens, ranks) in enumerate(steps):
        case = make_rows_case(seg_lens=lens, seg_ranks=ranks, in_features=72,
                              slice_sizes=(72, 24, 24), device=TRITON_DEVICE, seed=seed,
                              max_rank=20)  # fmt: skip
        buffers.fill(lens, case.seg_rows, case.info.seg_scaling.tolist())
        expected = case.y.clone()
        lora_reference.lora_apply(case.x, expected, case.a_rows, case.bt_rows, case.info,
                                  case.slice_offsets)  # fmt: skip
        y = case.y.clone()
        lora_apply(case.x, y, case.a_rows, case.bt_rows, info, case.slice_offsets)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_gpu_graph_replays_each_steps_contents() -> None:
    # captured once on static buffers (arena, x, y, metadata); each replay follows the last fill
    buffers = LoraBatchBuffers(max_tokens=32, max_segments=32, max_row_entries=32 * 64,
                               max_rank=64, device=torch.device("cuda"))  # fmt: skip
    info = buffers.info(max_tokens=32)
    steps = [([1] * 32, [64, 8, 16, 32] * 8), ([2], [64]), ([5, 0, 20, 7], [0, 16, 8, 64])]
    cases = [make_rows_case(seg_lens=lens, seg_ranks=ranks, in_features=4096,
                            slice_sizes=(4096, 1024, 1024), dtype=torch.bfloat16, device="cuda",
                            seed=seed, max_rank=64)
             for seed, (lens, ranks) in enumerate(steps)]  # fmt: skip
    num_rows = max(case.arena.shape[0] for case in cases)
    arena = torch.empty(num_rows, cases[0].arena.shape[1], dtype=torch.bfloat16, device="cuda")
    a_off, b_off = cases[0].a_rows.storage_offset(), cases[0].bt_rows.storage_offset()
    a_rows, bt_rows = arena[:, a_off : a_off + 3 * 4096], arena[:, b_off : b_off + 6144]
    x = torch.zeros(32, 4096, dtype=torch.bfloat16, device="cuda")
    y = torch.zeros(32, 6144, dtype=torch.bfloat16, device="cuda")
    lora_apply(x, y, a_rows, bt_rows, info, (0, 4096, 5120, 6144))  # compile off the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_apply(x, y, a_rows, bt_rows, info, (0, 4096, 5120, 6144))
    for case, (lens, _) in zip(cases, steps, strict=True):
        arena.fill_(float("nan"))
        arena[: case.arena.shape[0]] = case.arena
        n = sum(lens)
        x[:n], y[:n], y[n:] = case.x, case.y, 0
        buffers.fill(lens, case.seg_rows, case.info.seg_scaling.tolist())
        graph.replay()
        expected = case.y.clone()
        lora_reference.lora_apply(case.x, expected, case.a_rows, case.bt_rows, case.info,
                                  case.slice_offsets)  # fmt: skip
        torch.testing.assert_close(y[:n], expected, atol=3e-2, rtol=2e-2)
        assert bool((y[n:] == 0).all()), "rows past the step were written"
    assert int(info.counters.abs().sum()) == 0
