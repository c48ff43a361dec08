"""Building blocks of the decoder: RMSNorm, rotary embedding, the LoRA-aware fused linear layer.

Plain tensors, inference only (no nn.Module, no autograd); numerics follow HF transformers.
"""

from __future__ import annotations

import math

import lorasrv_kernels
import torch
import torch.nn.functional as F

from lorasrv.model.arch import ModelArch
from lorasrv.model.lora_backend import LoraStep
from lorasrv.model.lora_pool import ModuleLora


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
    """`y = x Wᵀ + b` over fused parts, plus each token's adapter delta from the arena's rows."""

    __slots__ = ("bias", "lora", "slice_offsets", "weight")

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
        # Set by ModelRunner when this module is a LoRA target: views of the arena's rows.
        self.lora: ModuleLora | None = None

    def forward(self, x: torch.Tensor, lora: LoraStep | None) -> torch.Tensor:
        if lora is not None and self.lora is not None:
            return lora.linear(x, self.weight, self.bias, self.lora)  # the backend's choice
        return F.linear(x, self.weight, self.bias)  # [num_tokens, out_total]


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
    if lora is not None and gate_up.lora is not None:
        # A backend that fuses it adds the gate/up delta inside the activation (no expand).
        act = lora.gate_up_act(x, gate_up.weight, gate_up.lora)
        if act is not None:
            return down.forward(act, lora)
    gate_up_out = gate_up.forward(x, lora)  # [num_tokens, 2 * intermediate]
    if gate_up_out.is_cuda and gate_up_out.stride(1) == 1:
        return down.forward(lorasrv_kernels.silu_mul(gate_up_out), lora)  # one launch
    gate, up = gate_up_out.chunk(2, dim=-1)
    return down.forward(F.silu(gate) * up, lora)
