#!/usr/bin/env bash
# GPU checks from a bare checkout: `bash bench/gpu_check.sh tests|bench|many|layer|prefix|all`
# (several modes: `tests,bench`). tests: the gpu-marked kernel and model tests (graphs vs eager,
# uploads under graphs, runner vs HF, PEFT, stale pages); bench: bench/bench_engine.py (8 x r16);
# many: bench/bench_many.py (64+ adapters); layer: bench/lora_layer.py; prefix: bench_prefix.py.
# tp (2 GPUs; not part of all): the gpu-marked TP tests, then bench/tp_check.py (graphs);
# tp-eager: bench/tp_check.py --eager.
# Each part runs even if the other failed; logs and latest.json go to $OUT (default /tmp/gpu-check).
# PYDEPS may name a folder of carried packages (msgspec) to put first on PYTHONPATH.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=",${1:-all},"
want() { [[ "$MODE" == *",$1,"* || "$MODE" == *",all,"* ]]; }
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

if want tests; then
    for target in tests/kernels tests/model; do
        name="$(basename "$target" .py)"
        echo "== pytest -m gpu $target"
        "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rA "$target" >"$OUT/pytest-$name.log" 2>&1 \
            || status=1
        grep -E "passed|failed|skipped|error|match rate|FAILED|ERROR" "$OUT/pytest-$name.log" | tail -40
    done
fi
if want bench; then
    echo "== bench/bench_engine.py"
    OUT="$OUT" "$PYTHON" bench/bench_engine.py --out "$OUT/latest.json" >"$OUT/bench.log" 2>&1 \
        || status=1
    sed -n '/== summary/,$p' "$OUT/bench.log"
    grep -E "Error|error" "$OUT/bench.log" | grep -v "^ERROR" | tail -10
fi
if want many; then
    echo "== bench/bench_many.py"
    OUT="$OUT" "$PYTHON" bench/bench_many.py --out "$OUT/bench_many.json" >"$OUT/many.log" 2>&1 \
        || status=1
    tail -25 "$OUT/many.log"
fi
if want layer; then
    echo "== bench/lora_layer.py"
    "$PYTHON" bench/lora_layer.py --check --out "$OUT/lora_layer.json" >"$OUT/layer.log" 2>&1 \
        || status=1
    tail -25 "$OUT/layer.log"
fi
if want prefix; then
    echo "== bench/bench_prefix.py"
    OUT="$OUT" "$PYTHON" bench/bench_prefix.py >"$OUT/prefix.log" 2>&1 || status=1
    tail -15 "$OUT/prefix.log"
fi
if [[ "$MODE" == *",tp,"* ]]; then
    echo "== pytest -m gpu tests/tp"
    "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rA tests/tp >"$OUT/pytest-tp.log" 2>&1 \
        || status=1
    grep -E "passed|failed|skipped|error|FAILED|ERROR" "$OUT/pytest-tp.log" | tail -20
    echo "== bench/tp_check.py"
    "$PYTHON" bench/tp_check.py --out "$OUT/tp_check.json" >"$OUT/tp_check.log" 2>&1 || status=1
    tail -45 "$OUT/tp_check.log"
fi
if [[ "$MODE" == *",tp-eager,"* ]]; then
    echo "== bench/tp_check.py --eager"
    "$PYTHON" bench/tp_check.py --eager --out "$OUT/tp_check_eager.json" >"$OUT/tp_check_eager.log" \
        2>&1 || status=1
    tail -45 "$OUT/tp_check_eager.log"
fi
rm -rf "$SHIM"
exit "$status"
