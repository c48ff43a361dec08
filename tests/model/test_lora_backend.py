"""LoraBackend objects on arena rows: a LoRA-targeted linear equals the dense formula from the
adapters' own weights (mixed ranks, no padding, base rows untouched); the Triton backend equals
the torch one; the fused gate/up activation equals linear then activation; what each backend
says it supports."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lorasrv.config import SUPPORTED_LORA_MODULES
from lorasrv.model.arch import ModelArch, parse_arch
from lorasrv.model.lora_backend import (
    LoraBackend,
    LoraSegments,
    LoraStep,
    OpsBackend,
    make_lora_backend,
)
from lorasrv.model.lora_layout import (
    AdapterWeights,
    LoraModuleWeights,
    pack_rows,
    pool_module_shapes,
    row_layout,
)
from lorasrv.model.lora_pool import LoraPool

CPU = torch.device("cpu")
MAX_RANK = 16
HAS_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", "triton"] if HAS_INTERPRET else ["torch"]


def tiny_arch() -> ModelArch:
    return parse_arch({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 40, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 10,
        "intermediate_size": 56, "vocab_size": 50,
    })  # fmt: skip


def adapter(arch: ModelArch, rank: int, seed: int) -> AdapterWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, shape in pool_module_shapes(arch).items():
        a = torch.randn(shape.num_slices * rank, shape.in_features, generator=gen) * 0.3
        modules[0, name] = LoraModuleWeights(a=a, b=torch.randn(shape.out_features, rank) * 0.3)
    return AdapterWeights(rank, 0.5 + seed, modules, SUPPORTED_LORA_MODULES, torch.float32)


class World:
    """Three adapters of ranks 3, 16, 7 in scattered rows of one pool; tokens 0-2 base."""

    def __init__(self) -> None:
        self.arch = tiny_arch()
        layout = row_layout(self.arch, SUPPORTED_LORA_MODULES)
        self.pool = LoraPool(torch.zeros(40, layout.row_elems), layout)
        self.adapters = [adapter(self.arch, r, seed) for seed, r in enumerate((3, 16, 7))]
        self.rows = [(22, 2, 17), tuple(range(39, 23, -1)), (0, 5, 9, 11, 13, 20, 21)]
        for weights, rows in zip(self.adapters, self.rows, strict=True):
            self.pool.write(rows, pack_rows(weights, layout, pin_memory=False).rows)
        # base 3 tokens, adapter 0: 2, adapter 1: 1, adapter 2: 4 tokens
        self.segments = LoraSegments(
            [3, 2, 1, 4], [(), *self.rows], [0.0, *(w.scaling for w in self.adapters)]
        )

    def dense(self, x: torch.Tensor, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The definition: each token's own adapter, `scaling * x Aᵀ Bᵀ` per slice."""
        shape = pool_module_shapes(self.arch)[name]
        y = F.linear(x, weight)
        starts = [0, 3, 5, 6, 10]
        for i, weights in enumerate(self.adapters):
            lo, hi = starts[i + 1], starts[i + 2]
            a, b = weights.modules[0, name]
            r = weights.rank
            for j in range(shape.num_slices):
                o0, o1 = shape.slice_offsets[j], shape.slice_offsets[j + 1]
                v = x[lo:hi] @ a[j * r : (j + 1) * r].T
                y[lo:hi, o0:o1] += weights.scaling * v @ b[o0:o1].T
        return y


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("module", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
def test_linear_matches_the_dense_definition(name: str, module: str) -> None:
    world = World()
    backend = make_lora_backend(name, CPU, MAX_RANK)
    step = LoraStep(backend, backend.prepare(world.segments, CPU))
    # each adapter at its own rank, its own rows: no padding to the max rank anywhere
    assert step.info.seg_rank[:4].tolist() == [0, 3, 16, 7]
    assert step.info.row_index.tolist() == [r for rows in world.rows for r in rows]
    shape = pool_module_shapes(world.arch)[module]
    x = torch.randn(10, shape.in_features, generator=torch.Generator().manual_seed(5))
    weight = torch.randn(shape.out_features, shape.in_features)
    lora = world.pool.module(0, module)
    assert lora is not None
    y = step.linear(x, weight, None, lora)
    torch.testing.assert_close(y, world.dense(x, module, weight), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y[:3], F.linear(x[:3], weight))  # base tokens: base output only


@pytest.mark.parametrize("name", BACKENDS)
def test_fused_gate_up_activation_matches_linear_then_activation(name: str) -> None:
    world = World()
    plain = make_lora_backend(name, CPU, MAX_RANK)
    assert isinstance(plain, OpsBackend)
    assert not plain.supports_fused_act
    fused = OpsBackend(
        name, plain.ops, max_rank=MAX_RANK, supports_cuda_graphs=False, supports_fused_act=True
    )
    info = plain.prepare(world.segments, CPU)
    shape = pool_module_shapes(world.arch)["gate_up_proj"]
    x = torch.randn(10, shape.in_features, generator=torch.Generator().manual_seed(6))
    weight = torch.randn(shape.out_features, shape.in_features)
    lora = world.pool.module(0, "gate_up_proj")
    assert lora is not None
    assert LoraStep(plain, info).gate_up_act(x, weight, lora) is None  # not fused: caller's job
    act = LoraStep(fused, info).gate_up_act(x, weight, lora)
    gate, up = world.dense(x, "gate_up_proj", weight).chunk(2, dim=-1)
    assert act is not None
    torch.testing.assert_close(act, F.silu(gate) * up, atol=1e-4, rtol=1e-4)


def test_what_backends_say() -> None:
    backends: dict[str, LoraBackend] = {
        n: make_lora_backend(n, CPU, 8) for n in ("torch", "triton")
    }
    assert not backends["torch"].supports_cuda_graphs  # it reads segment bounds on the host
    assert backends["triton"].supports_cuda_graphs
    assert make_lora_backend("auto", CPU, 8).name == "torch"
    with pytest.raises(ValueError, match="lora_backend 'cuda' not supported"):
        make_lora_backend("cuda", CPU, 8)
