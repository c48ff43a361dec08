"""tp_check.py's figures from its children's results: token agreement, speed ratios, the issue's
targets. Pure (no torch, no engine), so tests check it on made-up results.

A child's result: `{"tp_size", "device", "startup_s", "outputs": [{"lora", "output_ids"}],
"outputs_reordered": [...] (the reference mode only), "decode": [{"kind", "batch",
"tokens_per_s", "step_ms"}]}`, or `{"error": ...}`.
"""

from __future__ import annotations

from typing import Any

#: the issue's targets (2 GPUs of one host, Llama-3-8B shape, bf16)
DECODE_BS64_TARGET = 1.5  # tp2 / tp1 decode tok/s at batch 64, at least
ITL_BS1_TARGET = 0.75  # tp2 / tp1 inter-token latency at batch 1, at most


def token_match(reference: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of prompts whose first token / whole sequence agree, share of positions before the
    first divergence, first-token agreement of base and adapter rows apart."""
    first = sequences = prefix = total = 0
    by_kind: dict[str, list[int]] = {}
    for a, b in zip(reference, other, strict=True):
        ids_a, ids_b = a["output_ids"], b["output_ids"]
        same_first = bool(ids_a) and bool(ids_b) and ids_a[0] == ids_b[0]
        first += same_first
        sequences += ids_a == ids_b
        n = 0
        while n < min(len(ids_a), len(ids_b)) and ids_a[n] == ids_b[n]:
            n += 1
        prefix += n
        total += len(ids_a)
        kind = "base" if a["lora"] is None else "lora"
        by_kind.setdefault(kind, []).append(int(same_first))
    count = max(len(reference), 1)
    return {
        "num_prompts": len(reference),
        "first_token_match": first / count,
        "sequence_match": sequences / count,
        "prefix_match": prefix / max(total, 1),
        "first_token_match_by_lora": {k: sum(v) / len(v) for k, v in by_kind.items()},
    }


def decode_table(result: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(d["kind"], d["batch"]): d for d in result["decode"]}


def compare(reference: dict[str, Any], other: dict[str, Any], name: str) -> dict[str, Any]:
    """`{name}_decode_bs{b}[_{kind}]` (throughput ratio), `{name}_itl_bs{b}[_{kind}]` (step time
    ratio), agreement; kind "base" carries no suffix."""
    figures: dict[str, Any] = {}
    ref, got = decode_table(reference), decode_table(other)
    for (kind, batch), row in sorted(got.items()):
        base = ref.get((kind, batch))
        if base is None:
            continue
        suffix = "" if kind == "base" else f"_{kind}"
        figures[f"{name}_decode_bs{batch}{suffix}"] = row["tokens_per_s"] / base["tokens_per_s"]
        figures[f"{name}_itl_bs{batch}{suffix}"] = row["step_ms"] / base["step_ms"]
    figures[f"{name}_agreement"] = token_match(reference["outputs"], other["outputs"])
    return figures


def summarize(results: dict[int, dict[str, Any]], modes: list[int]) -> dict[str, Any]:
    """Every figure of the run: ratios of each mode against the first, agreement, targets."""
    reference = results[modes[0]]
    figures: dict[str, Any] = {}
    if "error" not in reference and reference.get("outputs_reordered"):
        figures[f"tp{modes[0]}_vs_tp{modes[0]}_reordered_agreement"] = token_match(
            reference["outputs"], reference["outputs_reordered"]
        )
    for tp_size in modes[1:]:
        if "error" in results[tp_size] or "error" in reference:
            continue
        figures.update(compare(reference, results[tp_size], f"tp{tp_size}_vs_tp{modes[0]}"))
    return {**figures, "targets": targets(figures)}


def targets(figures: dict[str, Any]) -> dict[str, Any]:
    """The issue's three targets for tp2 against tp1, where measured."""
    out: dict[str, Any] = {}
    decode = figures.get("tp2_vs_tp1_decode_bs64")
    if decode is not None:
        out["tp2_vs_tp1_decode_bs64"] = _target(decode, ">=", DECODE_BS64_TARGET)
    itl = figures.get("tp2_vs_tp1_itl_bs1")
    if itl is not None:
        out["tp2_vs_tp1_itl_bs1"] = _target(itl, "<=", ITL_BS1_TARGET)
    tp2 = figures.get("tp2_vs_tp1_agreement")
    tp1 = figures.get("tp1_vs_tp1_reordered_agreement")
    if tp2 is not None and tp1 is not None:
        # "no worse than tp1 against itself with another batch order": positions before the
        # first divergence, the finest of the three shares
        out["greedy_agreement_prefix"] = _target(tp2["prefix_match"], ">=", tp1["prefix_match"])
    return out


def _target(value: float, op: str, bound: float) -> dict[str, Any]:
    met = value >= bound if op == ">=" else value <= bound
    return {"value": value, "target": f"{op} {bound:.3g}", "met": met}


def report_lines(
    results: dict[int, dict[str, Any]], modes: list[int], summary: dict[str, Any]
) -> list[str]:
    """What the run prints: throughput per mode, kind and batch; agreement; targets."""
    lines = []
    for tp_size in modes:
        r = results[tp_size]
        if "error" in r:
            lines.append(f"tp{tp_size}: FAILED: {r['error']}")
            continue
        lines.append(f"tp{tp_size} ({r['device']}, startup {r['startup_s']:.1f}s):")
        for d in r["decode"]:
            lines.append(
                f"  {d['kind']:<6} bs {d['batch']:>3}: {d['tokens_per_s']:10.1f} tok/s, "
                f"{d['step_ms']:8.2f} ms/step"
            )
    for key, value in summary.items():
        if key.endswith("_agreement"):
            lines.append(
                f"{key}: first token {value['first_token_match']:.1%}, whole sequence "
                f"{value['sequence_match']:.1%}, positions before divergence "
                f"{value['prefix_match']:.1%}"
            )
        elif key != "targets":
            lines.append(f"{key}: {value:.3f}")
    for key, t in summary["targets"].items():
        lines.append(
            f"target {key}: {t['value']:.3f} {t['target']}: {'met' if t['met'] else 'NOT met'}"
        )
    return lines
