"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache, LoRA-aware.

Holds weights only; the KV cache, LoRA pool and step metadata are passed in by the runner.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F

from lorasrv.model.arch import ModelArch
from lorasrv.model.attention import AttentionBackend, AttentionMetadata, KvCache, store_kv
from lorasrv.model.layers import (
    LoraLinear,
    Rotary,
    add_rms_norm,
    apply_rotary,
    gated_mlp,
    rms_norm,
)
from lorasrv.model.lora_backend import LoraStep
from lorasrv.model.lora_layout import pool_module_shapes


class DecoderLayer:
    """Pre-norm attention then pre-norm gated MLP, each added to the residual stream."""

    def __init__(self, arch: ModelArch, weights: Mapping[str, torch.Tensor], prefix: str) -> None:
        shapes = pool_module_shapes(arch)
        self.arch = arch
        self.input_norm = weights[prefix + "input_layernorm.weight"]
        self.post_attention_norm = weights[prefix + "post_attention_layernorm.weight"]
        self.q_norm = weights.get(prefix + "q_norm.weight")  # Qwen3 only
        self.k_norm = weights.get(prefix + "k_norm.weight")
        self.qkv_proj = LoraLinear(
            weights[prefix + "qkv_proj.weight"],
            weights.get(prefix + "qkv_proj.bias"),
            shapes["qkv_proj"].slice_sizes,
        )
        self.o_proj = LoraLinear(
            weights[prefix + "o_proj.weight"],
            weights.get(prefix + "o_proj.bias"),
            (arch.hidden_size,),
        )
        self.gate_up_proj = LoraLinear(
            weights[prefix + "gate_up_proj.weight"], None, shapes["gate_up_proj"].slice_sizes
        )
        self.down_proj = LoraLinear(weights[prefix + "down_proj.weight"], None, (arch.hidden_size,))

    def lora_linears(self) -> dict[str, LoraLinear]:
        return {
            "qkv_proj": self.qkv_proj,
            "o_proj": self.o_proj,
            "gate_up_proj": self.gate_up_proj,
            "down_proj": self.down_proj,
        }

    def forward(
        self,
        hidden: torch.Tensor,
        pending: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        attention: AttentionBackend,
        lora: LoraStep | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is `hidden + pending`; the adds are deferred so that each one
        runs fused with the RMSNorm after it. Returns this layer's (hidden, pending)."""
        eps = self.arch.rms_norm_eps
        if pending is None:  # the first layer: hidden is the embedding
            attn_in = rms_norm(hidden, self.input_norm, eps)
        else:
            hidden, attn_in = add_rms_norm(hidden, pending, self.input_norm, eps)
        attn_out = self._attention(attn_in, cos_sin, kv, metadata, attention, lora)
        hidden, mlp_in = add_rms_norm(hidden, attn_out, self.post_attention_norm, eps)
        return hidden, gated_mlp(mlp_in, self.gate_up_proj, self.down_proj, lora)

    def _attention(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        attention: AttentionBackend,
        lora: LoraStep | None,
    ) -> torch.Tensor:
        arch = self.arch
        num_tokens = x.shape[0]
        qkv = self.qkv_proj.forward(x, lora)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split_with_sizes([arch.q_size, arch.kv_size, arch.kv_size], dim=-1)
        q = q.reshape(num_tokens, arch.num_heads, arch.head_dim)
        k = k.reshape(num_tokens, arch.num_kv_heads, arch.head_dim)
        v = v.reshape(num_tokens, arch.num_kv_heads, arch.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = rms_norm(q, self.q_norm, arch.rms_norm_eps)
            k = rms_norm(k, self.k_norm, arch.rms_norm_eps)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache, v_cache = kv
        store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
        out = attention.forward(q, k_cache, v_cache, metadata)  # [num_tokens, heads, head_dim]
        return self.o_proj.forward(out.reshape(num_tokens, arch.q_size), lora)


class LlamaModel:
    """Embedding, decoder layers, final norm and LM head; logits only for sampled tokens."""

    def __init__(
        self,
        arch: ModelArch,
        weights: Mapping[str, torch.Tensor],
        *,
        attention: AttentionBackend,
        device: torch.device,
    ) -> None:
        self.arch = arch
        self.attention = attention
        self.embed_tokens = weights["embed_tokens.weight"]  # [vocab, hidden]
        self.norm = weights["norm.weight"]
        # Tied checkpoints reuse the embedding matrix; no copy.
        self.lm_head = weights.get("lm_head.weight", self.embed_tokens)  # [vocab, hidden]
        self.rotary = Rotary(arch, device)
        self.layers = [DecoderLayer(arch, weights, f"layers.{i}.") for i in range(arch.num_layers)]

    def lora_linears(self) -> Iterator[tuple[int, str, LoraLinear]]:
        """(layer index, pool module name, layer) for every LoRA-capable linear."""
        for i, layer in enumerate(self.layers):
            for name, linear in layer.lora_linears().items():
                yield i, name, linear

    def forward(
        self,
        input_ids: torch.Tensor,
        metadata: AttentionMetadata,
        kv_cache: KvCache,
        lora: LoraStep | None,
        sample_index: torch.Tensor,
    ) -> torch.Tensor:
        """Run the new tokens through the model, writing their K/V into the cache.

        Args:
            input_ids: [num_tokens] int32/int64, the rows' new tokens concatenated.
            sample_index: [num_sampled] int64, token index of each sampled row's last token.

        Returns:
            logits: [num_sampled, vocab] float32.
        """
        hidden = self.embed(input_ids)  # [num_tokens, hidden]
        cos_sin = self.rotary.cos_sin(metadata.positions, hidden.dtype)
        pending: torch.Tensor | None = None  # the last block's output, not yet added
        for i, layer in enumerate(self.layers):
            hidden, pending = layer.forward(
                hidden, pending, cos_sin, kv_cache.layer(i), metadata, self.attention, lora
            )
        # The add and RMSNorm are per token: only the sampled rows need them.
        last = hidden[sample_index]
        if pending is not None:
            last = last + pending[sample_index]
        last = rms_norm(last, self.norm, self.arch.rms_norm_eps)
        return self.head(last)  # [num_sampled, vocab]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[num_tokens] -> [num_tokens, hidden]; parallel.TpLlamaModel splits it by vocab."""
        return F.embedding(input_ids, self.embed_tokens)

    def head(self, last: torch.Tensor) -> torch.Tensor:
        """[num_sampled, hidden] -> logits [num_sampled, vocab] float32."""
        # The head runs in the model dtype, as in HF, so greedy picks match it; then float32.
        return F.linear(last, self.lm_head).float()
