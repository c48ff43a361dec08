#!/usr/bin/env bash
# Serving benchmark on a GPU box, run from the repo root: builds a random Llama-3-8B-shaped model
# (+ 8 random rank-16 adapters) into /tmp, serves it with lorasrv, runs bench/load.py for the base
# model and for 8 distinct adapters, writes JSON and the server log to $OUT, stops the server.
# Every knob is an environment variable (defaults below); see bench/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OUT="${OUT:-${TMPDIR:-/tmp}/lorasrv-bench/serving}"  # scratch: never the committed bench/results/
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
SHAPE="${SHAPE:-llama3-8b}"
MODEL_DIR="${MODEL_DIR:-/tmp/lorasrv-bench/${SHAPE}-random}"
NUM_ADAPTERS="${NUM_ADAPTERS:-8}"
ADAPTER_RANK="${ADAPTER_RANK:-16}"
BUILD_DEVICE="${BUILD_DEVICE:-}"  # empty: cuda when available
SERVER_DTYPE="${SERVER_DTYPE:-bfloat16}"
PORT="${PORT:-30000}"
NUM_REQUESTS="${NUM_REQUESTS:-512}"
WARMUP_REQUESTS="${WARMUP_REQUESTS:-64}"
CONCURRENCY="${CONCURRENCY:-64}"
INPUT_LEN="${INPUT_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
RUN_TIMEOUT_S="${RUN_TIMEOUT_S:-180}"  # per load.py run, warm-up included
HEALTH_TIMEOUT_S="${HEALTH_TIMEOUT_S:-600}"
EXTRA_SERVER_ARGS="${EXTRA_SERVER_ARGS:-}"
URL="http://127.0.0.1:${PORT}"
ADAPTERS_DIR="${MODEL_DIR}-adapters"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

echo "== nvidia-smi"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" || echo "nvidia-smi not available"

# A bare checkout: the repo on the path, and kernels/ importable as lorasrv_kernels.
# PYDEPS may name a folder of carried packages (e.g. msgspec) to put first.
SHIM="$(mktemp -d /tmp/lorasrv-pypath.XXXXXX)"
ln -s "$ROOT/kernels/lorasrv_kernels" "$SHIM/lorasrv_kernels"
export PYTHONPATH="${PYDEPS:+$PYDEPS:}$ROOT:${PYTHONPATH:+$PYTHONPATH:}$SHIM"
export PYTHONUNBUFFERED=1
export LORASRV_CACHE_DIR="${LORASRV_CACHE_DIR:-/tmp/lorasrv-bench/cache}"  # the demo tokenizer
# Every third-party module lorasrv imports at top level must be importable (triton is optional).
if ! "$PYTHON" - <<'PY'
import ast, importlib.util, pathlib, sys
names = set()
for path in pathlib.Path("lorasrv").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
optional = {"triton", "uvloop", "transformers", "peft", "lorasrv", "lorasrv_kernels", "__future__"}
missing = sorted(n for n in names - optional - set(sys.stdlib_module_names)
                 if importlib.util.find_spec(n) is None)
if missing:
    sys.exit(f"missing server dependencies: {', '.join(missing)} (carry them; set PYDEPS)")
PY
then
    exit 1
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== model: $SHAPE -> $MODEL_DIR ($NUM_ADAPTERS adapters, rank $ADAPTER_RANK)"
LAST_ADAPTER="$ADAPTERS_DIR/a$((NUM_ADAPTERS - 1))/adapter_config.json"
if [[ -f "$MODEL_DIR/config.json" && -f "$LAST_ADAPTER" && -z "${REBUILD:-}" ]]; then
    echo "reusing it (REBUILD=1 to rebuild)"
else
    build_args=(--shape "$SHAPE" --output "$MODEL_DIR" --num-adapters "$NUM_ADAPTERS"
        --adapter-rank "$ADAPTER_RANK" --adapter-targets all --adapters-dir "$ADAPTERS_DIR")
    [[ -n "$BUILD_DEVICE" ]] && build_args+=(--device "$BUILD_DEVICE")
    "$PYTHON" bench/make_random_model.py "${build_args[@]}"
fi

lora_paths=()
adapter_names=()
for ((i = 0; i < NUM_ADAPTERS; i++)); do
    lora_paths+=("a$i=$ADAPTERS_DIR/a$i")
    adapter_names+=("a$i")
done

SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
    rm -rf "$SHIM"
}
trap stop_server EXIT

echo "== server on port $PORT (log: $OUT/server.log)"
# shellcheck disable=SC2086  # EXTRA_SERVER_ARGS is a list of flags
"$PYTHON" -m lorasrv --model-path "$MODEL_DIR" --dtype "$SERVER_DTYPE" --port "$PORT" \
    --host 127.0.0.1 --lora-paths "${lora_paths[@]}" --max-loras-per-batch 8 \
    $EXTRA_SERVER_ARGS >"$OUT/server.log" 2>&1 &
SERVER_PID=$!

started=$SECONDS
until "$PYTHON" -c "import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen('$URL/health', timeout=5).status == 200 else 1)
except Exception:
    sys.exit(1)" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "server exited during startup; last log lines:" >&2
        tail -n 40 "$OUT/server.log" >&2
        exit 1
    fi
    if ((SECONDS - started > HEALTH_TIMEOUT_S)); then
        echo "server not healthy after ${HEALTH_TIMEOUT_S}s; last log lines:" >&2
        tail -n 40 "$OUT/server.log" >&2
        exit 1
    fi
    sleep 2
done
echo "healthy after $((SECONDS - started)) s"

status=0
run_load() {  # name, adapters
    echo "== load: $1 (adapters: $2)"
    "$PYTHON" bench/load.py --url "$URL" --num-requests "$NUM_REQUESTS" \
        --concurrency "$CONCURRENCY" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --adapters "$2" --warmup-requests "$WARMUP_REQUESTS" --timeout-s "$RUN_TIMEOUT_S" \
        --seed 0 --json "$OUT/$1.json" || status=1
}
run_load base none
run_load "lora${NUM_ADAPTERS}" "$(IFS=,; echo "${adapter_names[*]}")"

stop_server
# One markdown row per run, for bench/README.md's table.
"$PYTHON" - "$OUT" base "lora${NUM_ADAPTERS}" <<'PY' | tee "$OUT/summary.md"
import json, os, sys
out, runs = sys.argv[1], sys.argv[2:]
print("| run | ok/failed | req/s | out tok/s | TTFT p50/p99 ms | ITL p50/p99 ms | E2E p50 ms |")
print("|---|---|---|---|---|---|---|")
for run in runs:
    path = os.path.join(out, f"{run}.json")
    if not os.path.isfile(path):
        print(f"| {run} | no result | | | | | |")
        continue
    with open(path) as f:
        m = json.load(f)
    def ms(key):
        return "-" if m.get(key) is None else f"{m[key]:.1f}"
    print(f"| {run} | {m['requests_ok']}/{m['requests_failed']} | {m['request_throughput']:.2f} "
          f"| {m['output_token_throughput']:.0f} | {ms('ttft_p50_ms')} / {ms('ttft_p99_ms')} "
          f"| {ms('itl_p50_ms')} / {ms('itl_p99_ms')} | {ms('e2e_p50_ms')} |")
PY
echo "== results in $OUT"
ls -l "$OUT"
exit "$status"
