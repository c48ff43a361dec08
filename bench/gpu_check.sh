#!/usr/bin/env bash
# GPU checks from a bare checkout: `bash bench/gpu_check.sh tests|bench|all`. tests: the gpu-marked
# kernel and model tests (graphs vs eager, uploads under graphs, runner vs HF, PEFT, stale pages);
# bench: bench/bench_engine.py.
# Each part runs even if the other failed; logs and latest.json go to $OUT (default /tmp/gpu-check).
# PYDEPS may name a folder of carried packages (msgspec) to put first on PYTHONPATH.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-all}"
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
SHIM="$(mktemp -d /tmp/lorasrv-shim.XXXXXX)"
ln -s "$ROOT/kernels/lorasrv_kernels" "$SHIM/lorasrv_kernels"
export PYTHONPATH="${PYDEPS:+$PYDEPS:}$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export LORASRV_CACHE_DIR="${LORASRV_CACHE_DIR:-/tmp/lorasrv-cache}"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
status=0

if [[ "$MODE" == tests || "$MODE" == all ]]; then
    for target in tests/kernels tests/model; do
        name="$(basename "$target" .py)"
        echo "== pytest -m gpu $target"
        "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rA "$target" >"$OUT/pytest-$name.log" 2>&1 \
            || status=1
        grep -E "passed|failed|skipped|error|match rate|FAILED|ERROR" "$OUT/pytest-$name.log" | tail -40
    done
fi
if [[ "$MODE" == bench || "$MODE" == all ]]; then
    echo "== bench/bench_engine.py"
    OUT="$OUT" "$PYTHON" bench/bench_engine.py --out "$OUT/latest.json" >"$OUT/bench.log" 2>&1 \
        || status=1
    sed -n '/== summary/,$p' "$OUT/bench.log"
    grep -E "Error|error" "$OUT/bench.log" | grep -v "^ERROR" | tail -10
fi
rm -rf "$SHIM"
exit "$status"
