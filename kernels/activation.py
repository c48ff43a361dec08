"""The gated MLP's activation, `silu(gate) * up`, as one Triton launch (torch takes two and a
temporary the size of the gate).

Owns the kernel and its typed launcher; rounding follows torch step by step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# @triton.jit bodies are untyped except their tl.constexpr params; the launchers are fully typed.
# mypy: disable-error-code="no-untyped-def,untyped-decorator"


@triton.jit
def _silu_mul_kernel(
    # pointers
    gate_up_ptr,  # [num_rows, 2 * num_cols]: gate columns, then up columns
    out_ptr,  # [num_rows, num_cols]
    # sizes
    num_cols,
    # strides
    stride_in,
    stride_out,
    # meta
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_cols
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + num_cols + offs, mask=mask, other=0.0)
    # torch: silu in float32 rounded to the dtype, then the product rounded again.
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (act * up.to(tl.float32)).to(dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for the fused gate/up projection's output, one launch.

    Semantics: `F.silu(g) * u` with `g, u = gate_up.chunk(2, -1)`, each op rounded to
    gate_up.dtype as torch does (equal up to the last bit of float32 `exp`).

    Args:
        gate_up: [num_rows, 2 * num_cols], float32/float16/bfloat16; rows may be strided,
            columns contiguous.

    Returns:
        [num_rows, num_cols] in gate_up.dtype, contiguous.
    """
    num_rows, width = gate_up.shape
    assert width % 2 == 0, "gate_up must hold gate and up halves"
    assert gate_up.stride(1) == 1, "gate_up: columns must be contiguous"
    num_cols = width // 2
    out = torch.empty(num_rows, num_cols, dtype=gate_up.dtype, device=gate_up.device)
    if num_rows == 0:
        return out
    block = min(1024, int(triton.next_power_of_2(num_cols)))
    grid = (num_rows, triton.cdiv(num_cols, block))
    _silu_mul_kernel[grid](
        gate_up, out, num_cols, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out
