"""bench_many.py's runs replayed on the CPU in virtual time: the real SchedulerActor (planner,
residency, admission) and the real AdapterRegistry (names, host cap, reloads), driven message by
message, with a runner whose step time follows many_sim_model's cost model fitted to the H100.
No torch, no event loop: a run of 256 requests takes a few seconds.

    python bench/many_sim.py                       # every run of bench_many.py: predicted ratios
    python bench/many_sim.py --runs zipf64_cap8 --json /tmp/sim.json

It predicts what scheduling decides (decode steps, rows per step, distinct adapters per step,
waits for host loads and uploads), not kernel speed: tune admission and residency here, then
confirm on a GPU with `bash bench/gpu_check.sh many`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_many as bmany  # noqa: E402
import many_sim_model as model  # noqa: E402
from many_sim_engine import Scenario, SimEngine  # noqa: E402

from lorasrv.engine import invariants  # noqa: E402
from lorasrv.messages import EmitTokens, RequestFailed  # noqa: E402

#: bench_many.py on the H100 (c56617a): tok/s ratio to base, decode steps, adapters per step.
MEASURED: dict[str, dict[str, float]] = {
    "zipf64": {"ratio": 0.573, "decode_steps": 514, "adapters_per_decode_step": 27.0},
    "uniform64": {"ratio": 0.642, "decode_steps": 514, "adapters_per_decode_step": 39.9},
    "zipf64_cap8": {"ratio": 0.165, "decode_steps": 2922, "adapters_per_decode_step": 7.8},
    "zipf1000": {"ratio": 0.461, "decode_steps": 518, "adapters_per_decode_step": 43.5},
}


def scenarios() -> dict[str, Scenario]:
    """bench_many.py's engines at their GPU defaults."""
    ranks64 = tuple(bmany.cycled((8, 16, 32, 64), 64))
    all64 = Scenario(tuple(f"a{i}" for i in range(64)), ranks64, model.ALL, 64)
    files = bmany.cycled((8, 16), 64)  # 1,000 names over 64 folders
    many = Scenario(tuple(f"m{i}" for i in range(1000)), tuple(files[i % 64] for i in range(1000)),
                    model.ATTN, 16, max_loaded=128)  # fmt: skip
    return {
        "zipf64": all64,
        "uniform64": all64._replace(popularity="uniform"),
        "zipf64_cap8": all64._replace(cap=8),
        "zipf1000": many,
    }


class Workload(NamedTuple):
    requests: int = 256
    concurrency: int = 64
    prompt_len: int = 128
    new_tokens: int = 128
    seed: int = 0
    zipf_alpha: float = 1.0


BENCH = Workload()  # bench_many.py's GPU defaults
HOST = model.HostModel()


class Record(NamedTuple):
    lora: str | None
    cold: bool
    start_s: float
    ttft_s: float
    end_s: float
    tokens: int


class Client:
    """bench_many.client: `concurrency` requests in flight, the next one when one ends."""

    def __init__(self, engine: SimEngine, loras: Sequence[str | None], work: Workload,
                 new_tokens: int, tag: str) -> None:  # fmt: skip
        self.engine, self.loras, self.work, self.new_tokens = engine, list(loras), work, new_tokens
        self.tag = tag
        self.prompts = bmany.make_prompts(len(self.loras), work.prompt_len, 1000, work.seed)
        self.next = 0
        self.live: dict[str, list[Any]] = {}  # request id -> [lora, cold, start, first, tokens]
        self.records: list[Record] = []

    def start(self) -> None:
        for _ in range(min(self.work.concurrency, len(self.loras))):
            self._submit()

    @property
    def done(self) -> bool:
        return len(self.records) == len(self.loras)

    def on_output(self, msg: Any) -> None:
        now = self.engine.clock.now
        state = self.live[msg.request_id]
        if isinstance(msg, RequestFailed):
            raise AssertionError(f"{msg.request_id} failed: {msg.detail}")
        assert isinstance(msg, EmitTokens)
        if msg.token_ids and not state[4]:
            state[3] = now - state[2]
        state[4] += len(msg.token_ids)
        if msg.finish_reason is not None:
            del self.live[msg.request_id]
            self.records.append(Record(state[0], state[1], state[2], state[3], now, state[4]))
            if self.next < len(self.loras):
                self._submit()

    def _submit(self) -> None:
        i, self.next = self.next, self.next + 1
        lora, rid = self.loras[i], f"{self.tag}{i}"
        cold = lora is not None and not self.engine.is_resident(lora)
        self.live[rid] = [lora, cold, self.engine.clock.now, 0.0, 0]
        self.engine.submit(rid, self.prompts[i], lora, self.new_tokens)


def run_phase(engine: SimEngine, loras: Sequence[str | None], work: Workload, new_tokens: int,
              tag: str) -> tuple[list[Record], float, float]:  # fmt: skip
    client = Client(engine, loras, work, new_tokens, tag)
    engine.tokenizer.on_output = client.on_output
    started = engine.clock.now
    client.start()
    engine.clock.run(lambda: client.done)
    return client.records, started, engine.clock.now


def simulate(scenario: Scenario, work: Workload = BENCH, *, base: bool = False,
             cost: model.CostModel = model.H100, host: model.HostModel = HOST,
             check_invariants: bool = False) -> dict[str, Any]:  # fmt: skip
    """One engine: registration, bench_many's warm-up (2 tokens on each of the first
    `concurrency` names), then the run (base requests when `base`). The actors recheck their
    tables after every message only if `check_invariants` (slow on a full-size arena)."""
    was, invariants.enabled = invariants.enabled, check_invariants
    try:
        return _simulate(scenario, work, base, cost, host)
    finally:
        invariants.enabled = was


def _simulate(scenario: Scenario, work: Workload, base: bool, cost: model.CostModel,
              host: model.HostModel) -> dict[str, Any]:  # fmt: skip
    engine = SimEngine(scenario, cost, host, on_output=lambda msg: None)
    warm = list(scenario.names[: work.concurrency])
    run_phase(engine, warm, work, 2, "w")
    loras: list[str | None] = [None] * work.requests
    if not base:
        loras = list(bmany.choose_adapters(work.requests, scenario.names, scenario.popularity,
                                           work.zipf_alpha, work.seed + 1))  # fmt: skip
    first_step = len(engine.runner.steps)
    records, started, ended = run_phase(engine, loras, work, work.new_tokens, "r")
    return summarize(records, engine.runner.steps[first_step:], ended - started, engine)


def summarize(records: Sequence[Record], steps: Sequence[Any], wall_s: float,
              engine: SimEngine) -> dict[str, Any]:  # fmt: skip
    tokens = sum(r.tokens for r in records)
    decode = [s for s in steps if s.shape.is_decode]
    prefill = [s for s in steps if not s.shape.is_decode]
    cold = [r.ttft_s for r in records if r.lora is not None and r.cold]
    warm = [r.ttft_s for r in records if r.lora is not None and not r.cold]
    busy = sum(s.end_s - s.start_s for s in steps)

    def mean(values: Sequence[float]) -> float | None:
        return round(sum(values) / len(values), 2) if values else None

    out = {
        "tok_s": round(tokens / wall_s, 1),
        "wall_s": round(wall_s, 3),
        "tokens": tokens,
        "decode_steps": len(decode),
        "prefill_steps": len(prefill),
        "rows_per_decode_step": mean([s.shape.rows for s in decode]),
        "adapters_per_decode_step": mean([s.shape.num_adapters for s in decode]),
        "decode_s": round(sum(s.end_s - s.start_s for s in decode), 3),
        "prefill_s": round(sum(s.end_s - s.start_s for s in prefill), 3),
        "idle_s": round(wall_s - busy, 3),
        "ttft_p50_s": bmany.percentile([r.ttft_s for r in records], 0.5),
        "ttft_p99_s": bmany.percentile([r.ttft_s for r in records], 0.99),
        "ttft_p50_cold_s": bmany.percentile(cold, 0.5),
        "ttft_p50_warm_s": bmany.percentile(warm, 0.5),
        "num_cold": len(cold),
        "uploads": sum(s.num_uploads for s in steps),
        "host_loads": engine.adapters.num_loads,
    }
    out["cold_ttft_ratio"] = bmany.cold_ttft_ratio(out)
    return out


def predict(names: Sequence[str], work: Workload = BENCH, *,
            cost: model.CostModel = model.H100,
            host: model.HostModel = HOST) -> dict[str, Any]:  # fmt: skip
    """Each named run and its base run on the same engine; `ratio` = tok/s over base tok/s."""
    out: dict[str, Any] = {}
    table = scenarios()
    for name in names:
        scenario = table[name]
        started = time.perf_counter()
        base = simulate(scenario, work, base=True, cost=cost, host=host)
        run = simulate(scenario, work, cost=cost, host=host)
        run["ratio"] = round(run["tok_s"] / base["tok_s"], 3)
        run["base_tok_s"] = base["tok_s"]
        run["sim_s"] = round(time.perf_counter() - started, 1)
        if name in MEASURED:
            run["measured_h100_c56617a"] = MEASURED[name]
        out[name] = run
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--runs", default=",".join(scenarios()), help="comma list of runs")
    p.add_argument("--requests", type=int, default=BENCH.requests)
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(scenarios()))
    if unknown:
        p.error(f"unknown runs {unknown}; known: {sorted(scenarios())}")
    results = predict(names, Workload(requests=args.requests))
    text = json.dumps(results, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
