"""Write a random-weight Hugging Face Llama checkpoint of a named shape, plus random PEFT adapters.

For throughput benchmarks: torch + safetensors only; weights are generated on the GPU when asked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import torch
from safetensors.torch import save_file

ATTN_MODULES: Final = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: Final = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES: Final = ATTN_MODULES + MLP_MODULES
TOKENIZER_FILES: Final = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES: Final = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_BYTES: Final = 5 * 1000**3
# The demo tokenizer's special tokens (lorasrv.demo): the model's bos/eos ids come from them.
BOS_TOKEN: Final = "<|begin_of_text|>"
EOS_TOKENS: Final = ("<|end_of_text|>", "<|eot_id|>")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    std: float  # weight init std; see README: chosen so logits are not near-uniform

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one linear module."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[module]


LLAMA31_ROPE_SCALING: Final = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
SHAPES: Final = {
    # Llama-3.1-8B. std 0.02 (its initializer_range): logits have std ~1.3 over 128256 ids.
    "llama3-8b": Shape(
        4096, 32, 32, 8, 14336, 128256, 500000.0, LLAMA31_ROPE_SCALING, 131072, 0.02
    ),
    # Small enough for CPU tests; vocab = the demo tokenizer's; larger std as hidden is small.
    "tiny": Shape(256, 2, 4, 2, 512, 1024, 500000.0, None, 2048, 0.08),
}


# ----------------------------------------------------------------------------- base model


def tensor_plan(shape: Shape) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, is_norm) of every base weight, in checkpoint order."""
    plan: list[tuple[str, tuple[int, ...], bool]] = [
        ("model.embed_tokens.weight", (shape.vocab, shape.hidden), False)
    ]
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}"
        plan.append((f"{prefix}.input_layernorm.weight", (shape.hidden,), True))
        for module in ALL_MODULES:
            group = "self_attn" if module in ATTN_MODULES else "mlp"
            in_features, out_features = shape.module_shape(module)
            plan.append((f"{prefix}.{group}.{module}.weight", (out_features, in_features), False))
        plan.append((f"{prefix}.post_attention_layernorm.weight", (shape.hidden,), True))
    plan.append(("model.norm.weight", (shape.hidden,), True))
    plan.append(("lm_head.weight", (shape.vocab, shape.hidden), False))
    return plan


def plan_shards(
    plan: Sequence[tuple[str, tuple[int, ...], bool]], element_bytes: int, max_bytes: int
) -> list[list[tuple[str, tuple[int, ...], bool]]]:
    """Greedy split in order: a shard closes before the tensor that would push it past max."""
    shards: list[list[tuple[str, tuple[int, ...], bool]]] = [[]]
    size = 0
    for entry in plan:
        nbytes = element_bytes * _numel(entry[1])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _numel(dims: Sequence[int]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def random_tensors(
    entries: Sequence[tuple[str, tuple[int, ...], bool]],
    std: float,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> Iterator[tuple[str, torch.Tensor]]:
    device = generator.device
    for name, dims, is_norm in entries:
        if is_norm:
            yield name, torch.ones(dims, dtype=dtype, device=device)
        else:
            weight = torch.randn(dims, generator=generator, dtype=torch.float32, device=device)
            yield name, weight.mul_(std).to(dtype)


def write_model(
    out: Path,
    shape: Shape,
    *,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    shard_bytes: int,
) -> int:
    """Write the safetensors shards (+ index when more than one); returns the total bytes."""
    plan = tensor_plan(shape)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(plan, element_bytes, shard_bytes)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for index, entries in enumerate(shards, start=1):
        if len(shards) == 1:
            filename = "model.safetensors"
        else:
            filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            name: tensor.cpu()
            for name, tensor in random_tensors(entries, shape.std, dtype, generator)
        }
        save_file(tensors, out / filename, {"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, filename))
        print(f"  wrote {filename} ({len(tensors)} tensors)", flush=True)
        del tensors
    if len(shards) > 1:
        index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out / "model.safetensors.index.json", index_data)
    return total


def model_config(
    shape: Shape, dtype_name: str, bos_id: int | None, eos_ids: list[int]
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": shape.std,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": shape.rope_scaling,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


def copy_demo_tokenizer(out: Path) -> tuple[int | None, list[int]]:
    """Copy the demo model's tokenizer files; returns its (bos id, eos ids)."""
    from lorasrv.demo import ensure_demo_model  # the repo must be on PYTHONPATH

    demo_dir = Path(ensure_demo_model().model_path)
    for name in TOKENIZER_FILES:
        shutil.copyfile(demo_dir / name, out / name)
    with open(out / "tokenizer.json", encoding="utf-8") as f:
        added = {t["content"]: int(t["id"]) for t in json.load(f).get("added_tokens", [])}
    return added.get(BOS_TOKEN), [added[t] for t in EOS_TOKENS if t in added]


# ----------------------------------------------------------------------------- adapters


def adapter_config(
    base_path: str, rank: int, alpha: float, targets: Sequence[str]
) -> dict[str, Any]:
    """adapter_config.json with the keys peft writes for a plain LoRA."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def write_adapter(
    folder: Path,
    shape: Shape,
    *,
    base_path: str,
    rank: int,
    targets: Sequence[str],
    dtype: torch.dtype,
    generator: torch.Generator,
) -> None:
    """A PEFT LoRA: A ~ N(0, 1/in), B ~ N(0, 0.01^2) (non-zero, so the delta is real)."""
    folder.mkdir(parents=True, exist_ok=True)
    device = generator.device
    weights: dict[str, torch.Tensor] = {}
    for layer in range(shape.layers):
        for module in (m for m in ALL_MODULES if m in targets):
            in_features, out_features = shape.module_shape(module)
            group = "self_attn" if module in ATTN_MODULES else "mlp"
            key = f"base_model.model.model.layers.{layer}.{group}.{module}"
            a = torch.randn((rank, in_features), generator=generator, device=device)
            b = torch.randn((out_features, rank), generator=generator, device=device)
            weights[f"{key}.lora_A.weight"] = (a / in_features**0.5).to(dtype).cpu()
            weights[f"{key}.lora_B.weight"] = (b * 0.01).to(dtype).cpu()
    save_file(weights, folder / "adapter_model.safetensors", {"format": "pt"})
    _write_json(folder / "adapter_config.json", adapter_config(base_path, rank, 2 * rank, targets))


def parse_targets(spec: str) -> tuple[str, ...]:
    """`all`, `attn`, `mlp` or a comma list of module names -> module names, in model order."""
    groups = {"all": ALL_MODULES, "attn": ATTN_MODULES, "mlp": MLP_MODULES}
    wanted: set[str] = set()
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if item in groups:
            wanted.update(groups[item])
        elif item in ALL_MODULES:
            wanted.add(item)
        else:
            raise ValueError(
                f"unknown adapter target {item!r}; use all, attn, mlp or {ALL_MODULES}"
            )
    if not wanted:
        raise ValueError("no adapter targets")
    return tuple(m for m in ALL_MODULES if m in wanted)


# ----------------------------------------------------------------------------- main


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def default_adapters_dir(out: Path) -> Path:
    return out.with_name(out.name + "-adapters")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--output", type=Path, required=True, help="model folder to (re)write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, help="weight std (default: the shape's)")
    parser.add_argument("--num-layers", type=int, help="override the shape's layer count")
    parser.add_argument("--vocab-size", type=int, help="override the shape's vocabulary size")
    parser.add_argument("--shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 1000**3)
    parser.add_argument("--num-adapters", type=int, default=0)
    parser.add_argument("--adapter-rank", type=int, default=16)
    parser.add_argument("--adapter-targets", default="all", help="all | attn | mlp | q_proj,...")
    parser.add_argument(
        "--adapters-dir", type=Path, help="default: <output>-adapters; adapters a0, a1, ..."
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shape = SHAPES[args.shape]
    overrides = {"std": args.std, "layers": args.num_layers, "vocab": args.vocab_size}
    shape = replace(shape, **{k: v for k, v in overrides.items() if v is not None})
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    targets = parse_targets(args.adapter_targets)
    out: Path = args.output.resolve()
    started = time.perf_counter()
    if out.exists() and any(out.iterdir()):
        if not (out / "config.json").is_file():
            print(f"{out} exists and is not a model folder; refusing to overwrite", file=sys.stderr)
            return 2
        shutil.rmtree(out)  # an earlier output of this script (or another checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing {args.shape} ({shape.layers} layers, vocab {shape.vocab}) to {out} on {device}")
    bos_id, eos_ids = copy_demo_tokenizer(out)
    _write_json(out / "config.json", model_config(shape, args.dtype, bos_id, eos_ids))
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_ids, "do_sample": False}
    _write_json(out / "generation_config.json", generation)
    total = write_model(
        out,
        shape,
        dtype=dtype,
        device=device,
        seed=args.seed,
        shard_bytes=int(args.shard_gb * 1000**3),
    )
    lora_paths = []
    if args.num_adapters > 0:
        adapters_dir = (args.adapters_dir or default_adapters_dir(out)).resolve()
        generator = torch.Generator(device=device).manual_seed(args.seed + 1)
        for i in range(args.num_adapters):
            folder = adapters_dir / f"a{i}"
            if folder.exists():
                shutil.rmtree(folder)
            write_adapter(
                folder,
                shape,
                base_path=str(out),
                rank=args.adapter_rank,
                targets=targets,
                dtype=dtype,
                generator=generator,
            )
            lora_paths.append(f"a{i}={folder}")
    elapsed = time.perf_counter() - started
    print(f"done: {total / 1e9:.2f} GB of weights in {elapsed:.1f} s")
    if lora_paths:
        print("--lora-paths " + " ".join(lora_paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
