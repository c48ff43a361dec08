"""LoRA over arena rows: the reference against a per-token definition, each Triton op against the
reference over generated grids (popularity x batch size x ranks x module shapes).

CPU runs need TRITON_INTERPRET=1 before Python starts (float32 only: the interpreter's bf16 dot
is wrong); `-m gpu` adds float16/bfloat16 at Llama-3-8B shapes and CUDA-graph replay.
"""

from __future__ import annotations

import math

import pytest
import torch
from lorasrv_kernels import (
    ShrinkConfig,
    lora_apply,
    lora_expand,
    lora_reference,
    lora_shrink,
    lora_silu_mul,
)

from tests.kernels.lora_rows_cases import (
    POPULARITY,
    RowsCase,
    defined_v_mask,
    grid_case,
    lora_token_mask,
    make_rows_case,
)
from tests.kernels.marks import IS_INTERPRET, TRITON_DEVICE, needs_cuda, needs_triton

# (atol, rtol) against the reference. Interpreted float32 is exact up to summation order;
# compiled float32 runs IEEE dots; 16-bit outputs differ by a rounding at most.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5) if IS_INTERPRET else (1e-4, 1e-4),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
# in_features, slice sizes: odd hidden sizes 72 and 130, one to three slices.
MODULES: dict[str, tuple[int, tuple[int, ...]]] = {
    "qkv": (72, (72, 24, 24)),
    "gate_up": (72, (130, 130)),
    "o": (130, (130,)),
    "down": (130, (72,)),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), atol=atol, rtol=rtol)


def naive(case: RowsCase) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, y + delta) in float64 from the contract's formulas, one token and rank at a time."""
    x, a_rows, bt_rows = (
        case.x.double().cpu(),
        case.a_rows.double().cpu(),
        case.bt_rows.double().cpu(),
    )
    off = case.slice_offsets
    num_slices, in_features, max_rank = len(off) - 1, x.shape[1], case.info.max_rank
    v = torch.zeros(x.shape[0], num_slices * max_rank, dtype=torch.float64)
    y = case.y.double().cpu().clone()
    scaling = case.info.seg_scaling.tolist()
    token = 0
    for seg, (length, rows) in enumerate(zip(case.seg_lens, case.seg_rows, strict=True)):
        for t in range(token, token + length):
            for j in range(num_slices):
                for i, row in enumerate(rows):
                    a = a_rows[row, j * in_features : (j + 1) * in_features]
                    v[t, j * max_rank + i] = x[t] @ a
                    y[t, off[j] : off[j + 1]] += (
                        scaling[seg] * v[t, j * max_rank + i] * bt_rows[row, off[j] : off[j + 1]]
                    )
        token += length
    return v, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_reference_matches_definition(popularity: str, dtype: torch.dtype) -> None:
    case = grid_case(popularity, 9, "mixed", in_features=72, slice_sizes=(72, 24, 24), dtype=dtype)
    v_def, y_def = naive(case)
    v = lora_reference.lora_shrink(case.x, case.a_rows, case.info, 3)
    assert v.dtype == torch.float32
    assert_close(v, v_def, torch.float32 if dtype == torch.float32 else torch.float16)
    y = case.y.clone()
    lora_reference.lora_apply(case.x, y, case.a_rows, case.bt_rows, case.info, case.slice_offsets)
    assert_close(y, y_def, dtype)
    assert bool(torch.isfinite(y).all()), "NaN arena rows or base scaling leaked"


def check_ops(
    case: RowsCase, dtype: torch.dtype, shrink_config: ShrinkConfig | None = None
) -> None:
    """shrink, expand, apply (into a strided window) and, for two slices, the fused activation,
    against the reference; poisoned outputs; base rows untouched."""
    num_slices = len(case.slice_offsets) - 1
    v_ref = lora_reference.lora_shrink(case.x, case.a_rows, case.info, num_slices)
    defined = defined_v_mask(case, num_slices)
    v = lora_shrink(case.x, case.a_rows, case.info, num_slices, config=shrink_config)
    assert v.shape == v_ref.shape
    assert v.dtype == torch.float32
    assert_close(v.cpu()[defined], v_ref.cpu()[defined], torch.float32 if dtype == torch.float32
                 else torch.float16)  # fmt: skip
    assert int(case.info.counters.abs().sum()) == 0, "split-K counters not re-armed"

    y_ref = case.y.clone()
    lora_reference.lora_expand(v_ref, case.bt_rows, y_ref, case.info, case.slice_offsets)
    y = case.y.clone()
    lora_expand(v_ref, case.bt_rows, y, case.info, case.slice_offsets)
    assert_close(y, y_ref, dtype)
    base = ~lora_token_mask(case)
    assert torch.equal(y.cpu()[base], case.y.cpu()[base]), "expand wrote base rows"

    # apply into a column window of a wider output, as in a fused projection; sentinels around
    num_tokens, out_total = case.y.shape
    wide = torch.full((num_tokens, out_total + 8), 7.0, dtype=dtype, device=case.y.device)
    window = wide[:, 4 : 4 + out_total]
    window.copy_(case.y)
    lora_apply(case.x, window, case.a_rows, case.bt_rows, case.info, case.slice_offsets)
    assert_close(window, y_ref, dtype)
    assert bool((wide[:, :4] == 7.0).all())
    assert bool((wide[:, 4 + out_total :] == 7.0).all())
    assert bool(torch.isfinite(y_ref).all()), "the reference itself leaked NaN"

    if num_slices == 2:
        expected = lora_reference.lora_silu_mul(case.y, v_ref, case.bt_rows, case.info)
        out = lora_silu_mul(case.y, v_ref, case.bt_rows, case.info)
        assert_close(out, expected, dtype)


@needs_triton
@pytest.mark.parametrize("rank_set", ["mixed", "small"])
@pytest.mark.parametrize("num_tokens", [1, 6, 37])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_triton_grid(popularity: str, num_tokens: int, rank_set: str) -> None:
    # the module cycles with the case so that every shape meets every popularity
    names = list(MODULES)
    module = names[(POPULARITY.index(popularity) + num_tokens) % len(names)]
    in_features, slices = MODULES[module]
    case = grid_case(popularity, num_tokens, rank_set, in_features=in_features,
                     slice_sizes=slices, device=TRITON_DEVICE)  # fmt: skip
    check_ops(case, torch.float32)


@needs_triton
@pytest.mark.parametrize("module", MODULES)
def test_triton_modules_zipf(module: str) -> None:
    in_features, slices = MODULES[module]
    case = grid_case("zipf", 20, "mixed", in_features=in_features, slice_sizes=slices,
                     num_adapters=6, device=TRITON_DEVICE)  # fmt: skip
    check_ops(case, torch.float32)


# Persistent grids smaller than the work, and splits along K (the last arrival sums).
SHRINK_CONFIGS = {
    "split": ShrinkConfig(block_k=16, num_programs=64, min_k_chunks=1),
    "split_persistent": ShrinkConfig(block_k=16, num_programs=5, min_k_chunks=1),
    "one_program": ShrinkConfig(block_k=32, num_programs=1),
}


@needs_triton
@pytest.mark.parametrize("config", SHRINK_CONFIGS)
def test_triton_shrink_split_k(config: str) -> None:
    case = make_rows_case(seg_lens=[3, 1, 0, 2], seg_ranks=[20, 0, 8, 4], in_features=130,
                          slice_sizes=(72, 24, 24), device=TRITON_DEVICE)  # fmt: skip
    check_ops(case, torch.float32, SHRINK_CONFIGS[config])


@needs_triton
def test_triton_shrink_writes_every_defined_entry() -> None:
    # a poisoned output: every entry the contract defines is written, nothing else is
    case = grid_case("uniform", 11, "mixed", in_features=72, slice_sizes=(72,),
                     device=TRITON_DEVICE)  # fmt: skip
    poisoned = torch.full((11, case.info.max_rank), math.nan, device=TRITON_DEVICE)
    v = lora_shrink(case.x, case.a_rows, case.info, 1, out=poisoned)
    assert v is poisoned
    defined = defined_v_mask(case, 1)
    assert bool(torch.isfinite(v.cpu()[defined]).all())
    assert bool(torch.isnan(v.cpu()[~defined]).all())


@needs_triton
@pytest.mark.parametrize(("seg_lens", "seg_ranks"), [([], []), ([3, 2], [0, 0]), ([0, 0], [8, 4])])
def test_triton_no_lora_work(seg_lens: list[int], seg_ranks: list[int]) -> None:
    # empty batch, base rows only, empty segments only: nothing to do, nothing written
    case = make_rows_case(seg_lens=seg_lens, seg_ranks=seg_ranks, in_features=72,
                          slice_sizes=(36, 36), device=TRITON_DEVICE)  # fmt: skip
    v = lora_shrink(case.x, case.a_rows, case.info, 2)
    y = case.y.clone()
    lora_expand(v, case.bt_rows, y, case.info, case.slice_offsets)
    assert torch.equal(y, case.y)
    out = lora_silu_mul(case.y, torch.zeros_like(v), case.bt_rows, case.info)
    gate, up = case.y.chunk(2, dim=-1)
    assert_close(out, torch.nn.functional.silu(gate) * up, torch.float32)


# Llama-3-8B: hidden 4096, q 4096, k/v 1024, intermediate 14336.
LLAMA3_8B: dict[str, tuple[int, tuple[int, ...]]] = {
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
    "o": (4096, (4096,)),
    "down": (14336, (4096,)),
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("module", LLAMA3_8B)
def test_gpu_llama3_8b(module: str, popularity: str, dtype: torch.dtype) -> None:
    in_features, slices = LLAMA3_8B[module]
    case = grid_case(popularity, 64, "llama", in_features=in_features, slice_sizes=slices,
                     num_adapters=16, dtype=dtype, device="cuda")  # fmt: skip
    check_ops(case, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("module", LLAMA3_8B)
def test_gpu_llama3_8b_prefill_tiles(module: str) -> None:
    # long segments take 64-row token tiles
    in_features, slices = LLAMA3_8B[module]
    case = grid_case("zipf", 300, "llama", in_features=in_features, slice_sizes=slices,
                     num_adapters=5, dtype=torch.bfloat16, device="cuda")  # fmt: skip
    assert case.info.block_m == 64
    check_ops(case, torch.bfloat16)
