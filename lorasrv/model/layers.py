"""Building blocks of the decoder: RMSNorm, rotary embedding, the LoRA-aware fused linear layer.

Plain tensors, inference only (no nn.Module, no autograd); numerics follow HF transformers.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import lorasrv_kernels
import torch
import torch.nn.functional as F
from lorasrv_kernels import (
    SlotBatchInfo,
    reference,
    sgmv_expand_stacked,
    silu_mul_lora,
    triton_lora_forward,
)

from lorasrv.model.arch import ModelArch


class LoraOp(Protocol):
    """`y += LoRA delta` in place; `lorasrv_kernels.reference.lora_forward` or the Triton one."""

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        a_stack: torch.Tensor,
        b_stack: torch.Tensor,
        info: SlotBatchInfo,
        slice_offsets: tuple[int, ...],
    ) -> None: ...


class StackedExpandOp(Protocol):
    """`y += LoRA delta` from every slot's shrink, `v_all` (see `LoraLinear.attach_lora`)."""

    def __call__(
        self,
        v_all: torch.Tensor,
        b_stack: torch.Tensor,
        y: torch.Tensor,
        info: SlotBatchInfo,
        slice_offsets: tuple[int, ...],
    ) -> None: ...


class StackedActOp(Protocol):
    """`silu(gate) * up` of the stacked gate/up GEMM, its LoRA delta added on the way."""

    def __call__(
        self,
        gate_up: torch.Tensor,
        v_all: torch.Tensor,
        b_stack: torch.Tensor,
        info: SlotBatchInfo,
    ) -> torch.Tensor: ...


# Steps of at most this many tokens take the shrink from the base GEMM (`x @ [W; A].T`): at
# decode sizes the extra rows cost a few percent of the weight's bytes and save one launch per
# layer and module. Past it the extra columns are real FLOPs for every token, against a shrink
# over each token's own adapter only. Measured inside CUDA graphs on an H200, 8 adapters, r=16
# (bench/stacked_sweep.py): still ahead at 2048 tokens (a layer's LoRA 152 against 223 us).
STACKED_MAX_TOKENS = 2048
# Up to this many tokens the gate/up delta is added inside the activation kernel; at 2048 the
# separate expand and activation measured faster (835 against 857 us for gate/up).
FUSED_ACT_MAX_TOKENS = 512
_STACKED_EXPAND: dict[object, StackedExpandOp] = {
    reference.lora_forward: reference.sgmv_expand_stacked,
    triton_lora_forward: sgmv_expand_stacked,
}
_STACKED_ACT: dict[object, StackedActOp] = {triton_lora_forward: silu_mul_lora}


class LoraStep(NamedTuple):
    """What a LoRA-aware layer needs for one step; absent when no row has an adapter."""

    info: SlotBatchInfo
    op: LoraOp
    # Set: the stacked path (the shrink comes out of the base GEMM); None: shrink + expand.
    expand_stacked: StackedExpandOp | None = None
    # Set: gate/up's stacked delta is added inside this activation kernel (no gate/up expand).
    silu_mul_stacked: StackedActOp | None = None


def make_lora_step(info: SlotBatchInfo, op: LoraOp, num_tokens: int) -> LoraStep:
    """The step's LoRA: stacked when it is small and the op has a stacked expand; the gate/up
    delta inside the activation when smaller still and the backend has that kernel (Triton:
    on CUDA, or in the interpreter for the CPU tests)."""
    stacked = _STACKED_EXPAND.get(op) if num_tokens <= STACKED_MAX_TOKENS else None
    act = _STACKED_ACT.get(op) if num_tokens <= FUSED_ACT_MAX_TOKENS else None
    return LoraStep(info=info, op=op, expand_stacked=stacked, silu_mul_stacked=act)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalize in float32, round to x.dtype, then scale.

    CUDA: one Triton launch with the same roundings (torch's version is ~6 kernels per call,
    which dominates a CUDA-graph decode step of small batches).
    """
    if x.is_cuda and weight.dtype == x.dtype:
        return lorasrv_kernels.rms_norm(x, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next RMSNorm: `(s, rms_norm(s))`, `s = x + delta` in x.dtype.

    CUDA: one Triton launch (torch: the add plus the norm's launches).
    """
    if x.is_cuda and weight.dtype == x.dtype == delta.dtype and x.dim() == 2:
        return lorasrv_kernels.add_rms_norm(x, delta, weight, eps)
    total = x + delta
    return total, rms_norm(total, weight, eps)


class LoraLinear:
    """`y = x Wᵀ + b` over fused parts, plus each row's adapter delta from the slot pool."""

    __slots__ = ("a_stack", "b_stack", "bias", "slice_offsets", "stacked", "stacked_bias", "weight")

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, slice_sizes: tuple[int, ...]
    ) -> None:
        assert weight.shape[0] == sum(slice_sizes), "fused parts must add up to the weight rows"
        self.weight = weight  # [out_total, in]
        self.bias = bias  # [out_total] or None
        offsets = [0]
        for size in slice_sizes:
            offsets.append(offsets[-1] + size)
        self.slice_offsets = tuple(offsets)
        # Set by LoraPool.attach when this module is a LoRA target; views of the pool's stacks.
        self.a_stack: torch.Tensor | None = None  # [num_slots, num_slices * max_rank, in]
        self.b_stack: torch.Tensor | None = None  # [num_slots, out_total, max_rank]
        # [out_total + num_slots * num_slices * max_rank, in]: the weight, then every A row.
        self.stacked: torch.Tensor | None = None
        self.stacked_bias: torch.Tensor | None = None  # the bias, zeros under the A rows

    def attach_lora(self, stacked: torch.Tensor, b_stack: torch.Tensor, num_slots: int) -> None:
        """Serve LoRA from `stacked` = `[W; A[0]; A[1]; ...]` (the weight's rows copied in by
        the caller) and `b_stack`; the weight and A stack become views of it."""
        out_total, in_features = self.weight.shape
        assert stacked.shape[1] == in_features, "stacked rows must have the weight's width"
        assert (stacked.shape[0] - out_total) % num_slots == 0, "one A block per slot"
        self.weight = stacked[:out_total]
        self.stacked = stacked
        self.a_stack = stacked[out_total:].view(num_slots, -1, in_features)
        self.b_stack = b_stack
        if self.bias is not None:
            self.stacked_bias = torch.cat(
                [self.bias, self.bias.new_zeros(stacked.shape[0] - out_total)]
            )

    def stacked_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One GEMM over `[W; A]`: (y, v_all), each token's base output `[num_tokens, out_total]`
        and its shrink against every slot; strided views. None without stacked weights."""
        if self.stacked is None:
            return None
        wide = F.linear(x, self.stacked, self.stacked_bias)
        out_total = self.weight.shape[0]
        return wide[:, :out_total], wide[:, out_total:]

    def forward(self, x: torch.Tensor, lora: LoraStep | None) -> torch.Tensor:
        if lora is None or self.a_stack is None or self.b_stack is None:
            return F.linear(x, self.weight, self.bias)  # [num_tokens, out_total]
        expand = lora.expand_stacked
        parts = self.stacked_forward(x) if expand is not None else None
        if expand is not None and parts is not None:
            y, v_all = parts
            expand(v_all, self.b_stack, y, lora.info, self.slice_offsets)
            return y
        y = F.linear(x, self.weight, self.bias)
        lora.op(x, y, self.a_stack, self.b_stack, lora.info, self.slice_offsets)
        return y


class Rotary:
    """Rotary position embedding with HF's inverse frequencies (default, linear, llama3)."""

    def __init__(self, arch: ModelArch, device: torch.device) -> None:
        self.inv_freq = rope_inv_freq(arch).to(device)  # [head_dim // 2] float32

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each token, `[num_tokens, head_dim]`, computed in float32 as HF does."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [num_tokens, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [num_tokens, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[num_tokens, num_heads, head_dim]`; cos/sin `[num_tokens, head_dim]`.

    CUDA: one Triton launch, bitwise equal to the torch formula below.
    """
    if x.is_cuda and x.stride(-1) == 1 and cos.dtype == sin.dtype == x.dtype:
        return lorasrv_kernels.apply_rotary(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """`1 / theta^(2i/d)`, then the checkpoint's scaling; same float32 ops as transformers."""
    dim = arch.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim
    inv_freq = 1.0 / (arch.rope_theta**exponents)  # [dim // 2]
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def gated_mlp(
    x: torch.Tensor, gate_up: LoraLinear, down: LoraLinear, lora: LoraStep | None
) -> torch.Tensor:
    """`down(silu(gate(x)) * up(x))` with gate and up fused into one matmul."""
    if lora is not None and lora.silu_mul_stacked is not None:
        parts = gate_up.stacked_forward(x)
        if parts is not None and gate_up.b_stack is not None:
            # The gate/up LoRA delta is added inside the activation kernel: no expand launch.
            act = lora.silu_mul_stacked(*parts, gate_up.b_stack, lora.info)
            return down.forward(act, lora)
    gate_up_out = gate_up.forward(x, lora)  # [num_tokens, 2 * intermediate]
    if gate_up_out.is_cuda and gate_up_out.stride(1) == 1:
        return down.forward(lorasrv_kernels.silu_mul(gate_up_out), lora)  # one launch
    gate, up = gate_up_out.chunk(2, dim=-1)
    return down.forward(F.silu(gate) * up, lora)
