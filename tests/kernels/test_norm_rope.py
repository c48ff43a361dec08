"""RMSNorm (alone and after the residual add), rotary and SiLU-and-multiply kernels against
`lorasrv_kernels.reference` and torch (HF's formulas).

Rotary is bitwise equal in the interpreter; on the GPU it rounds once (an ulp apart). RMSNorm may
differ in the float32 sum order only.
CPU runs need TRITON_INTERPRET=1 (float32); `-m gpu` adds bfloat16/float16 at Llama-3-8B shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lorasrv_kernels import add_rms_norm, apply_rotary, reference, rms_norm, silu_mul

from tests.kernels.marks import TRITON_DEVICE, needs_cuda, needs_triton


def rope_inputs(
    num_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q as a strided column window of a fused qkv output, cos/sin from random positions."""
    width = num_heads * head_dim
    fused = torch.randn(num_tokens, width + 24, device=device).to(dtype)
    x = fused[:, 8 : 8 + width].view(num_tokens, num_heads, head_dim)
    angles = torch.rand(num_tokens, head_dim // 2, device=device) * 100
    emb = torch.cat((angles, angles), dim=-1)
    return x, emb.cos().to(dtype), emb.sin().to(dtype)


@needs_triton
@pytest.mark.parametrize(("num_tokens", "num_cols"), [(1, 72), (7, 130), (33, 64), (0, 72)])
def test_triton_rms_norm(num_tokens: int, num_cols: int) -> None:
    x = torch.randn(num_tokens, num_cols + 6, device=TRITON_DEVICE)[:, 3 : 3 + num_cols] * 3
    weight = torch.randn(num_cols, device=TRITON_DEVICE)
    out = rms_norm(x, weight, 1e-5)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference.rms_norm(x, weight, 1e-5), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize(("num_tokens", "num_cols"), [(1, 72), (7, 130), (0, 72)])
def test_triton_add_rms_norm(num_tokens: int, num_cols: int) -> None:
    x = torch.randn(num_tokens, num_cols, device=TRITON_DEVICE) * 3
    # delta as a column window of a wider output (the stacked o/down GEMMs give those)
    delta = torch.randn(num_tokens, num_cols + 6, device=TRITON_DEVICE)[:, 2 : 2 + num_cols]
    weight = torch.randn(num_cols, device=TRITON_DEVICE)
    total, out = add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)
    torch.testing.assert_close(out, reference.rms_norm(x + delta, weight, 1e-5), atol=1e-5,
                               rtol=1e-5)  # fmt: skip


@needs_triton
@pytest.mark.parametrize(("num_tokens", "num_cols"), [(1, 72), (5, 1100), (0, 8)])
def test_triton_silu_mul(num_tokens: int, num_cols: int) -> None:
    # gate/up as a column window of the stacked gate_up GEMM output; 1100 spans two blocks
    wide = torch.randn(num_tokens, 2 * num_cols + 10, device=TRITON_DEVICE) * 4
    gate_up = wide[:, : 2 * num_cols]
    gate, up = gate_up.chunk(2, dim=-1)
    out = silu_mul(gate_up)
    assert out.shape == (num_tokens, num_cols)
    torch.testing.assert_close(out, F.silu(gate) * up, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_rms_norm_per_head() -> None:
    # Qwen3's q/k norm: [tokens, heads, head_dim] normalized over head_dim.
    x, _, _ = rope_inputs(5, 3, 32, torch.float32, TRITON_DEVICE)
    weight = torch.randn(32, device=TRITON_DEVICE)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))


@needs_triton
@pytest.mark.parametrize(
    ("num_tokens", "num_heads", "head_dim"), [(1, 4, 16), (9, 3, 40), (0, 2, 8)]
)
def test_triton_rotary(num_tokens: int, num_heads: int, head_dim: int) -> None:
    x, cos, sin = rope_inputs(num_tokens, num_heads, head_dim, torch.float32, TRITON_DEVICE)
    out = apply_rotary(x, cos, sin)
    assert out.is_contiguous()
    assert torch.equal(out, reference.apply_rotary(x, cos, sin))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama3_8b(dtype: torch.dtype) -> None:
    torch.manual_seed(0)  # the inputs must not depend on which tests ran before
    for num_heads in (32, 8):  # q and k
        x, cos, sin = rope_inputs(64, num_heads, 128, dtype, "cuda")
        # On the GPU the kernel rounds once (fused multiply-add) where torch's bf16/fp16 formula
        # rounds after every op, so they differ by an ulp (seen on an H200, 2026-11-28); the
        # kernel must be as close to the float32 result on average (not element by element: one
        # rounding can land further off than three, and did on 2026-11-28 with other inputs)
        # and within the dtype's tolerance.
        exact = reference.apply_rotary(x.float(), cos.float(), sin.float())
        ours = apply_rotary(x, cos, sin).float()
        theirs = reference.apply_rotary(x, cos, sin).float()
        assert (ours - exact).abs().mean() <= (theirs - exact).abs().mean()
        tolerance = {torch.bfloat16: 1.6e-2, torch.float16: 1e-3}[dtype]
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
    x = torch.randn(64, 4096, device="cuda", dtype=dtype) * 4
    weight = torch.randn(4096, device="cuda", dtype=dtype)
    out, expected = rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5)
    # Only the sum order differs: at most one rounding step apart, rarely.
    torch.testing.assert_close(out, expected, atol=0.0, rtol=2 * torch.finfo(dtype).eps)
    assert float((out != expected).float().mean()) < 0.01


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_residual_and_mlp_ops(dtype: torch.dtype) -> None:
    x = torch.randn(64, 4096, device="cuda", dtype=dtype) * 4
    delta = torch.randn(64, 4096 + 128, device="cuda", dtype=dtype)[:, :4096]
    weight = torch.randn(4096, device="cuda", dtype=dtype)
    total, out = add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(total, x + delta)  # the add is torch's, bitwise
    expected = reference.rms_norm(x + delta, weight, 1e-5)
    torch.testing.assert_close(out, expected, atol=0.0, rtol=2 * torch.finfo(dtype).eps)
    gate_up = torch.randn(64, 2 * 14336 + 256, device="cuda", dtype=dtype)[:, : 2 * 14336] * 4
    gate, up = gate_up.chunk(2, dim=-1)
    act, expected = silu_mul(gate_up), F.silu(gate) * up
    # exp may differ in float32's last bit, which moves a rounding of silu now and then.
    torch.testing.assert_close(act, expected, atol=0.0, rtol=2 * torch.finfo(dtype).eps)
    assert float((act != expected).float().mean()) < 0.01
