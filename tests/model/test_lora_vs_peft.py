"""Multi-LoRA batches through ModelRunner vs PEFT: each row equals PEFT with its own adapter.

Mixes base rows and three adapters (ranks 4/8/16, q/v, all seven with rsLoRA, MLP with rank and
alpha patterns) in one batch, each at its own rank in shuffled arena rows; rows reused by another
adapter must leave nothing stale.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lorasrv.model.runner import ModelRunner
from tests.model.checkpoints import build_adapter
from tests.model.plan_driver import PlanDriver

MIXED = ("qv_r4", "all_r8_rslora", "mlp_r16_patterns")
# (prompt, adapter or None); two rows share each of two adapters, so segments hold several rows
ROWS: list[tuple[list[int], str | None]] = [
    (list(range(20, 60)), "all_r8_rslora"),
    ([5, 6, 7, 8, 9, 10, 11], None),
    (list(range(100, 123)), "qv_r4"),
    ([17, 3, 99], "mlp_r16_patterns"),
    ([42] * 3 + [7, 8], "all_r8_rslora"),
    (list(range(150, 162)), None),
]
MAX_NEW_TOKENS = 24

AdapterDir = Callable[[str], Path]


def peft_greedy(
    base_dir: Path, adapters: dict[str, Path], rows: list[tuple[list[int], str | None]], n: int
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens and first logits per row, from PEFT with that row's adapter active."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = sorted(adapters)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    tokens, logits = [], []
    for prompt, name in rows:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            if name is None:
                with model.disable_adapter():
                    out = model.generate(
                        input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=None
                    )
                    first = model(input_ids=ids).logits[0, -1]
            else:
                model.set_adapter(name)
                out = model.generate(
                    input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=None
                )
                first = model(input_ids=ids).logits[0, -1]
        tokens.append(out[0, len(prompt) :].tolist())
        logits.append(first.float())
    return tokens, logits


def make_runner(base_dir: Path, backend: str = "torch", lora: bool = True) -> ModelRunner:
    return ModelRunner(
        model_path=str(base_dir),
        device="cpu",
        page_size=4,
        num_kv_pages=256,
        enable_lora=lora,
        lora_max_rank=16,
        lora_target_modules=("all",),
        lora_backend=backend,
    )


def load_adapters(
    driver: PlanDriver, adapter_dir: AdapterDir, names: tuple[str, ...]
) -> dict[str, int]:
    load = driver.runner.make_adapter_loader()
    for i, name in enumerate(names):
        driver.add_adapter(100 + i, load(str(adapter_dir(name))))
    return {name: 100 + i for i, name in enumerate(names)}


def run_rows(
    driver: PlanDriver, ids: dict[str, int], rows: list[tuple[list[int], str | None]], n: int
) -> list[list[int]]:
    return driver.generate([p for p, _ in rows], [ids[a] if a else None for _, a in rows], n)


def test_mixed_batch_matches_peft(
    checkpoint_dir: Callable[[str], Path], adapter_dir: AdapterDir
) -> None:
    base_dir = checkpoint_dir("llama")
    driver = PlanDriver(make_runner(base_dir), token_budget=16, record_logits=True, lora_rows=48)
    ours = run_rows(driver, load_adapters(driver, adapter_dir, MIXED), ROWS, MAX_NEW_TOKENS)
    expected, logits = peft_greedy(
        base_dir, {a: adapter_dir(a) for a in MIXED}, ROWS, MAX_NEW_TOKENS
    )
    for i, (prompt, name) in enumerate(ROWS):
        assert ours[i] == expected[i], f"row {i} ({name}, prompt len {len(prompt)})"
        torch.testing.assert_close(driver.first_logits[i], logits[i], atol=1e-4, rtol=1e-4)
    # Non-vacuous: every adapter changes the continuation of a prompt the base also ran.
    base_driver = PlanDriver(make_runner(base_dir, lora=False), token_budget=16)
    base_out = run_rows(base_driver, {}, [(p, None) for p, _ in ROWS], MAX_NEW_TOKENS)
    for i, (_, name) in enumerate(ROWS):
        assert (ours[i] == base_out[i]) == (name is None), f"row {i} ({name})"


def test_rows_reused_leave_nothing_stale(
    checkpoint_dir: Callable[[str], Path], adapter_dir: AdapterDir
) -> None:
    """All seven modules at rank 16, then q/v at rank 4 into 4 of the same rows (the other 12
    keep the old adapter's data, which nothing may read)."""
    base_dir = checkpoint_dir("llama")
    driver = PlanDriver(make_runner(base_dir), token_budget=16, lora_rows=16)
    rows: list[tuple[list[int], str | None]] = [(list(range(30, 45)), "x"), ([9, 8, 7], None)]
    load = driver.runner.make_adapter_loader()
    results = {}
    for adapter_id, name in enumerate(("all_r16", "qv_r4")):
        driver.add_adapter(adapter_id, load(str(adapter_dir(name))))
        results[name] = run_rows(driver, {"x": adapter_id}, rows, 12)
        expected, _ = peft_greedy(base_dir, {"x": adapter_dir(name)}, rows, 12)
        assert results[name] == expected, name
        driver.remove_adapter(adapter_id)
    assert results["all_r16"][0] != results["qv_r4"][0]


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton backend needs CUDA or TRITON_INTERPRET=1 (set before Python starts)",
)
def test_triton_backend_matches_peft(
    checkpoint_dir: Callable[[str], Path], adapter_dir: AdapterDir
) -> None:
    base_dir = checkpoint_dir("llama")
    driver = PlanDriver(make_runner(base_dir, backend="triton"), token_budget=16, lora_rows=48)
    rows = [(p[:9], a) for p, a in ROWS[:4]]
    ours = run_rows(driver, load_adapters(driver, adapter_dir, MIXED), rows, 4)
    expected, _ = peft_greedy(base_dir, {a: adapter_dir(a) for a in MIXED}, rows, 4)
    assert ours == expected


# Many ranks in one batch, each adapter at its own rank (no padding to the max): (r, keywords)
MANY: dict[str, dict[str, Any]] = {
    "r1_all": {"r": 1, "lora_alpha": 4, "target_modules": "all-linear", "seed": 11},
    "r2_qk": {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj", "k_proj"], "seed": 12},
    "r3_o_down": {"r": 3, "lora_alpha": 5, "target_modules": ["o_proj", "down_proj"], "seed": 13},
    "r6_up_v_rslora": {"r": 6, "lora_alpha": 12, "target_modules": ["up_proj", "v_proj"],
                       "use_rslora": True, "seed": 14},
    "r11_all_pattern": {"r": 11, "lora_alpha": 22, "target_modules": "all-linear",
                        "rank_pattern": {"q_proj": 3}, "seed": 15},
    "r16_gate_q": {"r": 16, "lora_alpha": 8, "target_modules": ["gate_proj", "q_proj"], "seed": 16},
}  # fmt: skip


@pytest.fixture(scope="module")
def many_adapters(
    checkpoint_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("many")
    base = checkpoint_dir("llama")
    return {name: build_adapter(base, root / name, **kw) for name, kw in MANY.items()}


def test_many_ranks_match_peft(
    checkpoint_dir: Callable[[str], Path], many_adapters: dict[str, Path]
) -> None:
    """Six adapters of ranks 1-16 in shuffled, non-contiguous rows; the second batch's adapters
    were uploaded with the first batch's first step (a prefetch no row of it used)."""
    base_dir = checkpoint_dir("llama")
    driver = PlanDriver(make_runner(base_dir), token_budget=24, record_logits=True, lora_rows=40)
    load = driver.runner.make_adapter_loader()
    ids = {name: i for i, name in enumerate(MANY)}
    for name, path in many_adapters.items():
        rows = driver.add_adapter(ids[name], load(str(path)))
        assert len(rows) == MANY[name]["r"]  # its own rank: no padding rows
    assert any(
        b != a + 1 for rows in driver.adapter_rows.values() for a, b in itertools.pairwise(rows)
    )
    names = list(MANY)
    batches: list[list[tuple[list[int], str | None]]] = [
        [(list(range(20, 31)), names[0]), ([5, 6, 7], None), ([9] * 4, names[1]),
         (list(range(60, 69)), names[2]), ([33, 34], names[0])],
        [(list(range(100, 107)), names[3]), ([1, 2, 3, 4], names[4]), ([77], None),
         (list(range(40, 53)), names[5]), ([8, 9], names[4]), ([70, 71, 72], names[2])],
    ]  # fmt: skip
    for rows in batches:
        ours = run_rows(driver, ids, rows, 10)
        expected, logits = peft_greedy(base_dir, many_adapters, rows, 10)
        first = [driver.first_logits[s] for s in sorted(driver.first_logits)[-len(rows) :]]
        for i, (prompt, name) in enumerate(rows):
            assert ours[i] == expected[i], f"row {i} ({name}, prompt len {len(prompt)})"
            torch.testing.assert_close(first[i], logits[i], atol=1e-4, rtol=1e-4)
