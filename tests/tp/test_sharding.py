"""The sharding rules as plain functions: rank shards put back together give the whole weight,
replicated KV heads line up with their query heads, adapter shards survive packing, and the
control channel carries payloads larger than one broadcast."""

from __future__ import annotations

import datetime
import itertools
import threading

import pytest
import torch
from torch.distributed import TCPStore

from lorasrv.config import SUPPORTED_LORA_MODULES
from lorasrv.model.arch import ModelArch, parse_arch
from lorasrv.model.lora_layout import (
    AdapterWeights,
    LoraModuleWeights,
    pool_module_shapes,
    row_layout,
    unpack_module,
)
from lorasrv.model.sharding import (
    Shard,
    check_split,
    kv_heads,
    shard_adapter,
    shard_arch,
    shard_weight,
    vocab_range,
)
from lorasrv.tp.adapter_shards import pack_shards, unpack_shard
from lorasrv.tp.channel import CAPACITY_BYTES, ControlChannel


def arch(**overrides: int) -> ModelArch:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 4,
        "intermediate_size": 96,
        "vocab_size": 101,
    }
    return parse_arch({**config, **overrides})


@pytest.mark.parametrize("tp_size", [2, 4])
def test_column_and_row_shards_reassemble(tp_size: int) -> None:
    a = arch()
    qkv = torch.randn(a.q_size + 2 * a.kv_size, a.hidden_size)
    gate_up = torch.randn(2 * a.intermediate_size, a.hidden_size)
    down = torch.randn(a.hidden_size, a.intermediate_size)
    shards = [Shard(r, tp_size) for r in range(tp_size)]
    parts = [shard_weight("layers.0.qkv_proj.weight", qkv, a, s) for s in shards]
    local = shard_arch(a, shards[0])
    q_local = local.q_size
    q = torch.cat([p[:q_local] for p in parts if p is not None])
    assert torch.equal(q, qkv[: a.q_size])
    gates = [shard_weight("layers.0.gate_up_proj.weight", gate_up, a, s) for s in shards]
    inter = local.intermediate_size
    assert torch.equal(
        torch.cat([g[:inter] for g in gates if g is not None]), gate_up[: inter * tp_size]
    )
    downs = [shard_weight("layers.0.down_proj.weight", down, a, s) for s in shards]
    assert torch.equal(torch.cat([d for d in downs if d is not None], dim=1), down)


def test_replicated_kv_heads_follow_their_query_heads() -> None:
    a = arch(num_key_value_heads=2)  # 8 heads: KV head 0 serves q heads 0-3, head 1 q 4-7
    for rank in range(4):
        first, count = kv_heads(a, Shard(rank, 4))
        assert count == 1
        q_heads = range(rank * 2, rank * 2 + 2)
        assert all(h // 4 == first for h in q_heads)


def test_vocab_shards_cover_every_id_once() -> None:
    a = arch(vocab_size=101)
    ranges = [vocab_range(101, Shard(r, 4)) for r in range(4)]
    assert ranges[0][0] == 0
    assert ranges[-1][1] == 101
    assert all(lo == prev_hi for (_, prev_hi), (lo, _) in itertools.pairwise(ranges))
    embed = torch.randn(101, a.hidden_size)
    padded = [shard_weight("embed_tokens.weight", embed, a, Shard(r, 4)) for r in range(4)]
    assert {p.shape[0] for p in padded if p is not None} == {26}


def test_o_bias_only_on_rank_zero() -> None:
    bias = torch.randn(64)
    assert shard_weight("layers.0.o_proj.bias", bias, arch(), Shard(0, 2)) is bias
    assert shard_weight("layers.0.o_proj.bias", bias, arch(), Shard(1, 2)) is None


@pytest.mark.parametrize(
    ("overrides", "tp_size", "phrase"),
    [
        ({}, 3, "8 attention heads are not divisible by 3"),
        ({"num_key_value_heads": 4}, 8, None),  # replication: fine
        ({"num_key_value_heads": 8, "num_attention_heads": 24}, 6, "8 KV heads"),
        ({"intermediate_size": 90}, 4, "MLP width 90"),
    ],
)
def test_check_split(overrides: dict[str, int], tp_size: int, phrase: str | None) -> None:
    if phrase is None:
        check_split(arch(**overrides), tp_size)
        return
    with pytest.raises(ValueError, match=f"--tp-size {tp_size}") as info:
        check_split(arch(**overrides), tp_size)
    assert phrase in str(info.value)


def random_adapter(a: ModelArch, rank: int) -> AdapterWeights:
    modules = {}
    for name, shape in pool_module_shapes(a).items():
        modules[0, name] = LoraModuleWeights(
            a=torch.randn(shape.num_slices * rank, shape.in_features),
            b=torch.randn(shape.out_features, rank),
        )
    return AdapterWeights(
        rank=rank,
        scaling=0.5,
        modules=modules,
        target_modules=("q_proj", "o_proj", "down_proj"),
        dtype=torch.float32,
    )


def test_adapter_shards_follow_s_lora_and_survive_packing() -> None:
    """Each rank's bytes are its S-LoRA shard packed into that rank's rows, and unpack to it."""
    a = arch()
    weights = random_adapter(a, rank=4)
    targets = SUPPORTED_LORA_MODULES
    packed = pack_shards(weights, a, 2, targets)
    layout = row_layout(shard_arch(a, Shard(1, 2)), targets)  # every rank's rows are this wide
    assert packed.row_elems == layout.row_elems
    assert (packed.rank, packed.scaling) == (4, 0.5)
    for rank, data in enumerate(packed.buffers):
        assert layout == row_layout(shard_arch(a, Shard(rank, 2)), targets)
        expected = shard_adapter(weights, a, Shard(rank, 2))
        host = unpack_shard(packed.header(7, 4), data, pin_memory=False)
        assert host.rows.shape == (4, layout.row_elems)
        for key, module in expected.modules.items():
            got = unpack_module(host, layout.modules[key])
            assert torch.equal(got.a, module.a)
            assert torch.equal(got.b, module.b)
            shape = layout.modules[key].shape
            assert module.a.shape == (shape.num_slices * 4, shape.in_features)
            assert module.b.shape == (shape.out_features, 4)
    # Column-parallel A is whole on every rank; row-parallel B is whole on every rank.
    host = unpack_shard(packed.header(7, 4), packed.buffers[1], pin_memory=False)
    assert torch.equal(
        unpack_module(host, layout.modules[0, "qkv_proj"]).a, weights.modules[0, "qkv_proj"].a
    )
    assert torch.equal(
        unpack_module(host, layout.modules[0, "o_proj"]).b, weights.modules[0, "o_proj"].b
    )


def test_control_channel_carries_payloads_past_one_buffer() -> None:
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=30))
    payload = bytes(range(256)) * (3 * CAPACITY_BYTES // 256 + 7)
    got: dict[str, object] = {}

    def worker() -> None:
        # A client of its own: one TCPStore connection serializes blocking waits.
        client = TCPStore("127.0.0.1", store.port, timeout=datetime.timedelta(seconds=30))
        channel = ControlChannel(client, rank=1, size=2)
        got["small"] = channel.broadcast(None)
        got["large"] = channel.broadcast(None)
        channel.broadcast(got["large"], root=1)  # type: ignore[arg-type]
        got["tensor"] = channel.recv_tensor(0, 5)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    coordinator = ControlChannel(store, rank=0, size=2)
    assert coordinator.broadcast(b"hi") == b"hi"
    assert coordinator.broadcast(payload) == payload
    assert coordinator.broadcast(None, root=1) == payload
    coordinator.send_tensors({1: torch.arange(5, dtype=torch.uint8)})
    thread.join(30)
    assert got["small"] == b"hi"
    assert got["large"] == payload
    assert torch.equal(got["tensor"], torch.arange(5, dtype=torch.uint8))  # type: ignore[arg-type]
