"""A few seconds of training for the demo model on its corpus, so its greedy text reads as words.

Deterministic and offline: seeded batches, one CPU thread (a thread count changes float sums),
float32. The forward pass is Hugging Face Llama's arithmetic written in plain torch (tests check it
against transformers), so the trained weights mean the same to every Llama implementation.
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple

import torch
import torch.nn.functional as F

SEQ_LEN: Final = 64
BATCH: Final = 16
PEAK_LR: Final = 6e-3
ROPE_THETA: Final = 500000.0
RMS_EPS: Final = 1e-5


class Shape(NamedTuple):
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def forward(weights: dict[str, torch.Tensor], ids: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Logits `[batch, tokens, vocab]` of a Llama checkpoint's tensors (HF names), causal."""
    batch, tokens = ids.shape
    heads, kv_heads, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(tokens, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos(), angles.sin()

    def rotary(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-second, first), dim=-1) * sin

    def project(x: torch.Tensor, key: str, num: int) -> torch.Tensor:
        out = x @ weights[key].T
        return out.view(batch, tokens, num, head_dim).transpose(1, 2)  # [batch, num, tokens, d]

    x = weights["model.embed_tokens.weight"][ids]
    for layer in range(shape.num_layers):
        p = f"model.layers.{layer}."
        h = rms_norm(x, weights[p + "input_layernorm.weight"])
        q = rotary(project(h, p + "self_attn.q_proj.weight", heads))
        k = rotary(project(h, p + "self_attn.k_proj.weight", kv_heads))
        v = project(h, p + "self_attn.v_proj.weight", kv_heads)
        group = heads // kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = attn.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        x = x + attn @ weights[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"])
        gate = F.silu(h @ weights[p + "mlp.gate_proj.weight"].T)
        x = (
            x
            + (gate * (h @ weights[p + "mlp.up_proj.weight"].T))
            @ weights[p + "mlp.down_proj.weight"].T
        )
    return rms_norm(x, weights["model.norm.weight"]) @ weights["lm_head.weight"].T


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * weight


def train(
    weights: dict[str, torch.Tensor], stream: list[int], shape: Shape, steps: int
) -> list[float]:
    """Train `weights` in place on windows of the token `stream`; returns the step losses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # NOTE: more threads split sums differently: other bytes
    try:
        with torch.enable_grad():
            return _train(weights, torch.tensor(stream), shape, steps)
    finally:
        torch.set_num_threads(threads)
        for tensor in weights.values():
            tensor.requires_grad_(False)


def _train(
    weights: dict[str, torch.Tensor], data: torch.Tensor, shape: Shape, steps: int
) -> list[float]:
    params = [tensor.requires_grad_(True) for tensor in weights.values()]
    optimizer = torch.optim.AdamW(params, lr=PEAK_LR, betas=(0.9, 0.98), weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:  # cosine decay to zero
            group["lr"] = PEAK_LR * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=generator)
        windows = torch.stack([data[i : i + SEQ_LEN + 1] for i in starts.tolist()])
        logits = forward(weights, windows[:, :-1], shape)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def greedy(weights: dict[str, torch.Tensor], ids: list[int], shape: Shape, num: int) -> list[int]:
    """`num` greedy tokens after `ids` (no KV cache: the demo is tiny)."""
    out = list(ids)
    for _ in range(num):
        out.append(int(forward(weights, torch.tensor([out]), shape)[0, -1].argmax()))
    return out[len(ids) :]
