"""LoRA kernel tests: the reference against a per-row definition, each Triton op against it.

CPU runs need TRITON_INTERPRET=1 before Python starts (float32 only); `-m gpu` adds
float16/bfloat16 at Llama-3-8B shapes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from lorasrv_kernels import (
    SlotBatchInfo,
    prepare_slot_batch_info,
    reference,
    sgmv_expand,
    sgmv_expand_stacked,
    sgmv_shrink,
    silu_mul_lora,
    triton_lora_forward,
)

from tests.kernels.marks import HAS_CUDA, IS_INTERPRET, TRITON_DEVICE, needs_triton


class LoraCase(NamedTuple):
    x: torch.Tensor  # [num_tokens, in_features]
    y: torch.Tensor  # [num_tokens, out_total], the base output before the LoRA delta
    a_stack: torch.Tensor  # [num_slots, num_slices * max_rank, in_features]
    b_stack: torch.Tensor  # [num_slots, out_total, max_rank]
    info: SlotBatchInfo
    slice_offsets: tuple[int, ...]


def make_case(
    *,
    seg_lens: list[int],
    seg_slots: list[int],
    slot_ranks: list[int],
    in_features: int,
    slice_sizes: tuple[int, ...],
    max_rank: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    pad_value: float = 0.0,
    seed: int = 0,
) -> LoraCase:
    """Random adapters in slots; rows past each rank (and whole rank-0 slots) hold pad_value.

    pad_value 0 is the pool's invariant; NaN checks that nothing reads past `rank`.
    """
    gen = torch.Generator().manual_seed(seed)
    num_slots, num_slices = len(slot_ranks), len(slice_sizes)
    out_total = sum(slice_sizes)
    num_tokens = sum(seg_lens)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    a = randn(num_slots, num_slices, max_rank, in_features, std=1 / math.sqrt(in_features))
    b = randn(num_slots, out_total, max_rank, std=1 / math.sqrt(max_rank))
    for slot, rank in enumerate(slot_ranks):
        a[slot, :, rank:] = pad_value
        b[slot, :, rank:] = pad_value
    slot_scaling = [2.0 / max(rank, 1) + 0.25 * slot for slot, rank in enumerate(slot_ranks)]
    offsets = [0]
    for size in slice_sizes:
        offsets.append(offsets[-1] + size)
    return LoraCase(
        x=randn(num_tokens, in_features).to(dtype=dtype, device=device),
        y=randn(num_tokens, out_total).to(dtype=dtype, device=device),
        a_stack=a.reshape(num_slots, num_slices * max_rank, in_features).to(
            dtype=dtype, device=device
        ),
        b_stack=b.to(dtype=dtype, device=device),
        info=prepare_slot_batch_info(seg_lens, seg_slots, slot_ranks, slot_scaling, device),
        slice_offsets=tuple(offsets),
    )


def naive_lora(case: LoraCase) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, y + delta) in float64, one row at a time, from the definition (full padded rank)."""
    x, a_stack, b_stack, info, off = (
        case.x.double().cpu(),
        case.a_stack.double().cpu(),
        case.b_stack.double().cpu(),
        case.info,
        case.slice_offsets,
    )
    num_slices = len(off) - 1
    max_rank = b_stack.shape[2]
    v = torch.zeros(x.shape[0], num_slices * max_rank, dtype=torch.float64)
    y = case.y.double().cpu().clone()
    indptr, slots = info.seg_indptr.tolist(), info.seg_slot.tolist()
    ranks, scaling = info.slot_rank.tolist(), info.slot_scaling.tolist()
    for seg, slot in enumerate(slots):
        if slot < 0 or ranks[slot] == 0:
            continue
        for row in range(indptr[seg], indptr[seg + 1]):
            for j in range(num_slices):
                cols = slice(j * max_rank, (j + 1) * max_rank)
                v[row, cols] = a_stack[slot, cols] @ x[row]
                y[row, off[j] : off[j + 1]] += scaling[slot] * (
                    b_stack[slot, off[j] : off[j + 1]] @ v[row, cols]
                )
    return v, y


# (atol, rtol) against the reference. Interpreted float32 is exact up to summation order;
# compiled float32 dots run as tf32 on the GPU.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5) if IS_INTERPRET else (2e-2, 2e-2),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}

SLOT_RANKS = [4, 8, 16, 0]  # mixed ranks (max_rank 16) and an empty slot
# Odd feature sizes, base (-1) and rank-0 (slot 3) segments, one-token segments, an empty one,
# skewed [1, n-1], a long segment spanning several token blocks, uneven q/k/v slices.
CASES: dict[str, dict[str, object]] = {
    "qkv_mixed": {
        "seg_lens": [1, 3, 0, 1, 5, 2],
        "seg_slots": [0, -1, 1, 2, 3, 1],
        "in_features": 72,
        "slice_sizes": (72, 24, 24),
    },
    "gate_up_skewed_long": {
        "seg_lens": [1, 69],
        "seg_slots": [2, 0],
        "in_features": 130,
        "slice_sizes": (130, 130),
    },
    "o_one_token_segments": {
        "seg_lens": [1, 1, 1, 1],
        "seg_slots": [0, 1, 2, -1],
        "in_features": 72,
        "slice_sizes": (72,),
    },
    "down_single_segment": {
        "seg_lens": [33],
        "seg_slots": [1],
        "in_features": 130,
        "slice_sizes": (72,),
    },
    "no_lora_rows": {
        "seg_lens": [2, 0, 3],
        "seg_slots": [-1, 1, 3],
        "in_features": 72,
        "slice_sizes": (72, 24, 24),
    },
}


def cpu_case(name: str, *, device: str = "cpu", **overrides: object) -> LoraCase:
    kwargs = {"slot_ranks": SLOT_RANKS, "device": device, **CASES[name], **overrides}
    return make_case(**kwargs)  # type: ignore[arg-type]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[actual.dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu().to(actual.dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_naive(name: str, dtype: torch.dtype) -> None:
    case = cpu_case(name, dtype=dtype)
    v_naive, y_naive = naive_lora(case)
    v = reference.sgmv_shrink(case.x, case.a_stack, case.info, len(case.slice_offsets) - 1)
    assert v.dtype == dtype
    assert_close(v, v_naive)
    y = case.y.clone()
    reference.lora_forward(x=case.x, y=y, a_stack=case.a_stack, b_stack=case.b_stack,
                           info=case.info, slice_offsets=case.slice_offsets)  # fmt: skip
    assert_close(y, y_naive)


def stacked_gemm(case: LoraCase) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, v_all), views of the stacked base GEMM's output `x @ [W; A[0]; A[1]; ...].T`:
    y, its first out_total columns, set to case.y; v_all, the rest, every slot's shrink."""
    in_features = case.x.shape[1]
    out_total = case.y.shape[1]
    a_rows = case.a_stack.reshape(-1, in_features)  # [num_slots * num_slices * max_rank, in]
    weight = torch.cat([case.a_stack.new_zeros(out_total, in_features), a_rows])
    wide = case.x @ weight.T  # [num_tokens, out_total + num_slots * num_slices * max_rank]
    wide[:, :out_total] = case.y
    return wide[:, :out_total], wide[:, out_total:]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_stacked_matches_naive(name: str, dtype: torch.dtype) -> None:
    case = cpu_case(name, dtype=dtype)
    _, y_naive = naive_lora(case)
    y, v_all = stacked_gemm(case)
    reference.sgmv_expand_stacked(v_all, case.b_stack, y, case.info, case.slice_offsets)
    assert_close(y, y_naive)


@needs_triton
@pytest.mark.parametrize("pad_value", [0.0, math.nan])
@pytest.mark.parametrize("name", CASES)
def test_triton_expand_stacked(name: str, pad_value: float) -> None:
    # NaN padding: v_all then holds NaN in every column past a slot's rank and in the whole
    # block of the rank-0 slot; none of it may reach y.
    case = cpu_case(name, device=TRITON_DEVICE, pad_value=pad_value)
    y_ref, v_ref = stacked_gemm(case)
    reference.sgmv_expand_stacked(v_ref, case.b_stack, y_ref, case.info, case.slice_offsets)
    y, v_all = stacked_gemm(case)
    sgmv_expand_stacked(v_all, case.b_stack, y, case.info, case.slice_offsets)
    assert bool(torch.isfinite(y_ref).all())
    assert_close(y, y_ref)
    assert bool(torch.isfinite(y).all())
    # The kernel writes y only: the shrink columns are left as the GEMM wrote them.
    torch.testing.assert_close(v_all, stacked_gemm(case)[1], equal_nan=True)


@needs_triton
@pytest.mark.parametrize("split_k", [None, 1, 2])
@pytest.mark.parametrize("name", CASES)
def test_triton_shrink(name: str, split_k: int | None) -> None:
    case = cpu_case(name, device=TRITON_DEVICE)
    num_slices = len(case.slice_offsets) - 1
    expected = reference.sgmv_shrink(case.x, case.a_stack, case.info, num_slices)
    v = sgmv_shrink(case.x, case.a_stack, case.info, num_slices, split_k=split_k)
    assert v.shape == expected.shape
    assert v.dtype == expected.dtype
    assert_close(v, expected)


@needs_triton
@pytest.mark.parametrize("name", CASES)
def test_triton_expand(name: str) -> None:
    case = cpu_case(name, device=TRITON_DEVICE)
    v = reference.sgmv_shrink(case.x, case.a_stack, case.info, len(case.slice_offsets) - 1)
    expected = case.y.clone()
    reference.sgmv_expand(v, case.b_stack, expected, case.info, case.slice_offsets)
    y = case.y.clone()
    sgmv_expand(v, case.b_stack, y, case.info, case.slice_offsets)
    assert_close(y, expected)


@needs_triton
@pytest.mark.parametrize("name", CASES)
def test_triton_lora_forward_into_strided_view(name: str) -> None:
    case = cpu_case(name, device=TRITON_DEVICE)
    expected = case.y.clone()
    reference.lora_forward(case.x, expected, case.a_stack, case.b_stack, case.info,
                           case.slice_offsets)  # fmt: skip
    # y is a column window of a wider output, as when LoRA adds into a fused projection.
    num_tokens, out_total = case.y.shape
    wide = torch.full((num_tokens, out_total + 8), 7.0, device=TRITON_DEVICE)
    y = wide[:, 4 : 4 + out_total]
    y.copy_(case.y)
    triton_lora_forward(case.x, y, case.a_stack, case.b_stack, case.info, case.slice_offsets)
    assert_close(y, expected)
    assert bool((wide[:, :4] == 7.0).all())
    assert bool((wide[:, 4 + out_total :] == 7.0).all())


@needs_triton
def test_triton_never_reads_past_rank() -> None:
    # Stale weights in rank-0 slots and past each rank must not leak into the output.
    case = cpu_case("qkv_mixed", device=TRITON_DEVICE, pad_value=math.nan)
    expected = case.y.clone()
    reference.lora_forward(case.x, expected, case.a_stack, case.b_stack, case.info,
                           case.slice_offsets)  # fmt: skip
    y = case.y.clone()
    triton_lora_forward(case.x, y, case.a_stack, case.b_stack, case.info, case.slice_offsets)
    assert bool(torch.isfinite(expected).all())
    assert_close(y, expected)
    # The shrink leaves zeros past each rank, whatever the pool holds there.
    v = sgmv_shrink(case.x, case.a_stack, case.info, 3, split_k=2)
    assert_close(v, reference.sgmv_shrink(case.x, case.a_stack, case.info, 3))


@needs_triton
def test_triton_empty_batch() -> None:
    case = make_case(seg_lens=[], seg_slots=[], slot_ranks=SLOT_RANKS, in_features=72,
                     slice_sizes=(72, 24, 24), device=TRITON_DEVICE)  # fmt: skip
    v = sgmv_shrink(case.x, case.a_stack, case.info, 3)
    assert v.shape == (0, 48)
    triton_lora_forward(case.x, case.y, case.a_stack, case.b_stack, case.info, case.slice_offsets)


# Llama-3-8B: hidden 4096, q 4096, k/v 1024, intermediate 14336.
LLAMA3_8B_MODULES: dict[str, tuple[int, tuple[int, ...]]] = {
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
    "o": (4096, (4096,)),
    "down": (14336, (4096,)),
}
GPU_SLOT_RANKS = [16, 8, 4, 16, 0, 8, 16, 12]  # 8 slots, max_rank 16


def spread_tokens(num_tokens: int) -> tuple[list[int], list[int]]:
    """Uneven segments over the 8 slots plus one base segment, adapter rows first."""
    slots = [0, -1, 1, 2, 3, 4, 5, 6, 7][: min(num_tokens, 9)]
    lens = [max(1, num_tokens // (2 * len(slots)))] * len(slots)
    lens[0] += num_tokens - sum(lens)  # one long segment, the rest short
    return lens, slots


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or IS_INTERPRET, reason="needs CUDA, without the interpreter")
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 256])
@pytest.mark.parametrize("module", LLAMA3_8B_MODULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama3_8b_shapes(dtype: torch.dtype, module: str, num_tokens: int) -> None:
    in_features, slice_sizes = LLAMA3_8B_MODULES[module]
    seg_lens, seg_slots = spread_tokens(num_tokens)
    case = make_case(seg_lens=seg_lens, seg_slots=seg_slots, slot_ranks=GPU_SLOT_RANKS,
                     in_features=in_features, slice_sizes=slice_sizes, dtype=dtype,
                     device="cuda")  # fmt: skip
    num_slices = len(slice_sizes)
    v_ref = reference.sgmv_shrink(case.x, case.a_stack, case.info, num_slices)
    assert_close(sgmv_shrink(case.x, case.a_stack, case.info, num_slices), v_ref)
    y_ref = case.y.clone()
    reference.sgmv_expand(v_ref, case.b_stack, y_ref, case.info, case.slice_offsets)
    y = case.y.clone()
    sgmv_expand(v_ref, case.b_stack, y, case.info, case.slice_offsets)
    assert_close(y, y_ref)
    y = case.y.clone()
    triton_lora_forward(case.x, y, case.a_stack, case.b_stack, case.info, case.slice_offsets)
    assert_close(y, y_ref)
    y_stacked_ref, v_all = stacked_gemm(case)
    reference.sgmv_expand_stacked(v_all, case.b_stack, y_stacked_ref, case.info,
                                  case.slice_offsets)  # fmt: skip
    y_stacked, v_all = stacked_gemm(case)
    sgmv_expand_stacked(v_all, case.b_stack, y_stacked, case.info, case.slice_offsets)
    assert_close(y_stacked, y_stacked_ref)
    assert_close(y_stacked, y_ref)


@needs_triton
@pytest.mark.parametrize("pad_value", [0.0, math.nan])
@pytest.mark.parametrize("name", ["qkv_mixed", "gate_up_skewed_long", "no_lora_rows"])
def test_triton_silu_mul_lora(name: str, pad_value: float) -> None:
    # the fused gate/up epilogue == the stacked expand into y, then silu(gate) * up
    case = cpu_case(name, device=TRITON_DEVICE, pad_value=pad_value, slice_sizes=(40, 40))
    y_ref, v_ref = stacked_gemm(case)
    reference.sgmv_expand_stacked(v_ref, case.b_stack, y_ref, case.info, case.slice_offsets)
    gate, up = y_ref.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    y, v_all = stacked_gemm(case)
    out = silu_mul_lora(y, v_all, case.b_stack, case.info)
    assert bool(torch.isfinite(expected).all())
    assert_close(out, expected)
