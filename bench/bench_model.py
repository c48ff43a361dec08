"""Helpers of bench_engine.py: a random-weight ModelRunner built on the device (no weight files),
PEFT adapter folders, decode StepPlans, HBM byte counts, and timing.

Only a config.json, the demo tokenizer and the adapters are written (to /dev/shm when it exists);
the base weights are drawn on the device by patching the runner's weight loader.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_random_model as mrm

from lorasrv.ids import AdapterId, BlockId, SeqId, StepId
from lorasrv.messages import AdapterRows, HostCopyReady, NewSeq, SamplingParams, StepPlan

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=1 << 20, ignore_eos=True)
WEIGHT_STATS: dict[str, int] = {}  # filled by the patched loader: bytes read per decode step


def scratch_dir() -> Path:
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="lorasrv-bench-", dir=root))


def write_model_dir(out: Path, shape: mrm.Shape, dtype_name: str) -> None:
    """config.json, generation_config.json and the demo tokenizer: everything but weights."""
    out.mkdir(parents=True, exist_ok=True)
    bos_id, eos_ids = mrm.copy_demo_tokenizer(out)
    mrm._write_json(out / "config.json", mrm.model_config(shape, dtype_name, bos_id, eos_ids))
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_ids, "do_sample": False}
    mrm._write_json(out / "generation_config.json", gen)


def write_adapters(
    root: Path, base: Path, shape: mrm.Shape, num: int, rank: int, device: torch.device
) -> dict[str, Path]:
    """`num` PEFT folders a0.. with all seven modules, rank `rank` (random A and B)."""
    generator = torch.Generator(device=device).manual_seed(1)
    paths = {}
    for i in range(num):
        folder = root / f"a{i}"
        mrm.write_adapter(folder, shape, base_path=str(base), rank=rank,
                          targets=mrm.ALL_MODULES, dtype=torch.bfloat16 if device.type == "cuda"
                          else torch.float32, generator=generator)  # fmt: skip
        paths[f"a{i}"] = folder
    return paths


@contextlib.contextmanager
def random_base_weights(std: float, seed: int = 0) -> Iterator[None]:
    """While active, ModelRunner draws its base weights on its device instead of reading files."""
    from lorasrv.model import runner as runner_module
    from lorasrv.model.loader import weight_plan

    def load(_model_dir: str, arch: Any, *, dtype: torch.dtype, device: torch.device,
             **_: Any) -> dict[str, torch.Tensor]:  # fmt: skip
        generator = torch.Generator(device=device).manual_seed(seed)
        weights: dict[str, torch.Tensor] = {}
        for name, (_, shape) in weight_plan(arch).items():
            if name.endswith("norm.weight"):
                weights[name] = torch.ones(shape, dtype=dtype, device=device)
            else:
                w = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                weights[name] = w.mul_(std).to(dtype)
        total = sum(t.numel() * t.element_size() for t in weights.values())
        embed = weights["embed_tokens.weight"]
        # Decode reads every weight once, except the embedding (a few rows) unless it is the head.
        tied = "lm_head.weight" not in weights
        WEIGHT_STATS["decode_weight_bytes"] = total - (
            0 if tied else embed.numel() * embed.element_size()
        )
        WEIGHT_STATS["total_weight_bytes"] = total
        return weights

    original = runner_module.load_model_weights
    runner_module.load_model_weights = load  # type: ignore[assignment]
    try:
        yield
    finally:
        runner_module.load_model_weights = original


def build_runner(model_dir: Path, std: float, **kwargs: Any) -> Any:
    from lorasrv.model.runner import ModelRunner

    with random_base_weights(std):
        return ModelRunner(model_path=str(model_dir), **kwargs)


def load_adapters(runner: Any, paths: list[Path]) -> tuple[AdapterRows, ...]:
    """Hand the runner each adapter's host copy; returns each one's rows, taken from the top of
    the arena down (their pages never hold KV: `decode_plans` hands out pages from the bottom)."""
    load = runner.make_adapter_loader()
    placed, next_row = [], runner.ready().lora_max_rows
    for i, path in enumerate(paths):
        host = load(str(path))
        copy = HostCopyReady(
            adapter_id=AdapterId(i), weights=host, rank=host.rank, scaling=host.scaling
        )
        runner.add_host_copy(copy)
        next_row -= host.rank
        placed.append(AdapterRows(AdapterId(i), tuple(range(next_row, next_row + host.rank))))
    return tuple(placed)


def decode_plans(
    num_rows: int,
    context_len: int,
    adapters: list[int],
    page_size: int,
    placed: tuple[AdapterRows, ...] = (),
    step_id: int = 0,
) -> tuple[StepPlan, StepPlan]:
    """(first plan registering the seqs and uploading `placed`, steady plan): every row decodes
    at `context_len`; `adapters[r]` is row r's index into `placed` (-1 = base)."""
    pages = context_len // page_size + 1
    tables = tuple(tuple(BlockId(r * pages + j) for j in range(pages)) for r in range(num_rows))
    common: dict[str, Any] = {
        "seq_ids": tuple(SeqId(r) for r in range(num_rows)),
        "input_ids": tuple(100 + r for r in range(num_rows)),
        "query_lens": (1,) * num_rows,
        "context_lens": (context_len,) * num_rows,
        "block_tables": tables,
        "lora_adapters": tuple(sorted(adapters)),
        "adapters": placed if any(a >= 0 for a in adapters) else (),
        "sample_rows": (True,) * num_rows,
    }
    new = tuple(NewSeq(seq_id=SeqId(r), params=GREEDY, prompt_ids=(1,)) for r in range(num_rows))
    first = StepPlan(step_id=StepId(step_id), new_seqs=new, uploads=placed, **common)
    return first, StepPlan(step_id=StepId(step_id + 1), **common)


def free_plan(num_rows: int) -> StepPlan:
    return StepPlan(step_id=StepId(0), freed_seq_ids=tuple(SeqId(r) for r in range(num_rows)))


def arena_pages(model_dir: Path, num_kv_pages: int, num_adapters: int, rank: int) -> int:
    """`num_kv_pages` of KV plus room for `num_adapters` adapters of `rank` in LoRA rows (all
    seven modules): the arena holds both, so the workload's KV never has to give way."""
    from lorasrv.model.arch import read_arch
    from lorasrv.model.lora_layout import row_layout
    from lorasrv.model.startup import kv_geometry

    arch = read_arch(str(model_dir))
    row_elems = row_layout(arch, tuple(mrm.ALL_MODULES)).row_elems
    page_elems = kv_geometry(arch, 16).page_elems
    return num_kv_pages + -(-num_adapters * rank * row_elems // page_elems) + 1


def adapter_bytes(runner: Any, rank: int) -> int:
    """Bytes of one rank-`rank` adapter in the arena: `rank` rows (A and B of every module)."""
    return rank * runner.ready().lora_row_bytes


def kv_bytes(runner: Any, num_rows: int, kv_len: int) -> int:
    arch = runner.arch
    element = runner.arena.geometry.element_size
    return num_rows * kv_len * arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * element


def median_time_s(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of fn over `iters` calls after `warmup` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, num_bytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (median of 20)."""
    src = torch.randn(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_time_s(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * src.numel() * 4 / seconds
