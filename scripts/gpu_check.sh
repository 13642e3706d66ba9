#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200, at most 7 minutes (TOTAL_BUDGET seconds; each step gets what the
# previous ones left):
#   1. CUDA tests (pytest -m cuda), most important first: tests/engine (CUDA-graph replay vs eager, never run on a
#      GPU yet), then tests/kernels, then tests/quant. On its timeout pytest gets SIGINT, so it still prints the
#      failures it saw. Only the modules holding cuda tests are collected (tests/test_lean_import.py checks that each
#      imports without pydantic, prefect, mlflow ...): another module that needs what this machine lacks would
#      otherwise turn the exit code into a collection error.
#   2. The benchmark (python -m qvggt.bench.run: qvggt bench's options without typer, whose recent releases import
#      pydantic), headline first: published / bf16-fused / w8a8-fp8 / w4a8-fp8 at 32 frames and published /
#      w4a8-fp8 peak memory at 100 frames, then the per-kernel section, then the other configs and frame counts
#      (w8a8-fp8-eager right after w8a8-fp8). It rewrites bench.json / bench.md after every measurement, so a
#      timed-out bench keeps what it measured.
#   3. Accuracy retention on the trained small model, last, only if RETENTION_MIN_S seconds are left (else recorded
#      as skipped); any failure there (e.g. pydantic missing) is recorded in bench.json / bench.md, not fatal.
#
#   bash scripts/gpu_check.sh                 # full: tests + bench at 1, 8, 32, 100 frames, all configs
#   FRAMES=8,32 CONFIGS=published,w8a8-fp8 bash scripts/gpu_check.sh
#   BENCH_ARGS="--no-kernels --height 56 --width 84" ...   # extra options of python -m qvggt.bench.run
#
# Files: everything is produced under WORK (default /tmp/qvggt_gpu_check, outside $OUT); $OUT gets a bounded set,
# flat (no subfolders), copied at the end and also when the script is interrupted (trap on EXIT; a background loop
# refreshes bench.json / bench.md every 20 s in case of a hard kill). $OUT holds at most 7 files:
#   gpu.txt  cuda_tests.log  bench.log  retention.log  bench.json  bench.md  gpu_check.tar.gz
# gpu_check.tar.gz holds all of WORK (bench_models.jsonl, the retention evaluation's logs, the pytest junit XML, the
# logs) except the retention predictions (*.npz).
#
# The GPU machine has torch and triton but nothing can be installed there from a registry: the core needs only
# torch, numpy, triton and safetensors. pydantic (qvggt.config's DataConfig, used by the retention section) can
# travel as wheels in .whl/ (docs/BENCHMARKS.md has the download command); without it the retention section is
# skipped with that reason and everything else runs.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
WORK=${WORK:-/tmp/qvggt_gpu_check}
FRAMES=${FRAMES:-1,8,32,100}
CONFIGS=${CONFIGS:-all}
TOTAL_BUDGET=${TOTAL_BUDGET:-410}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-330}
RETENTION_MIN_S=${RETENTION_MIN_S:-60}
RETENTION_SCENES=${RETENTION_SCENES:-4}
RETENTION_CKPT=${RETENTION_CKPT:-models/small/model.safetensors}
BENCH_ARGS=${BENCH_ARGS:-}
START=$SECONDS
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK/bench"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
test_rc=none bench_rc=none retention_rc=none

copy_results() {  # the bench document into $OUT (atomic per file: a reader never sees half a file)
    local f
    for f in bench.json bench.md; do
        # per-process temp name: the 20 s sync loop and the final copy may overlap
        [ -f "$WORK/bench/$f" ] && cp "$WORK/bench/$f" "$OUT/.$f.$BASHPID.tmp" && mv -f "$OUT/.$f.$BASHPID.tmp" "$OUT/$f"
    done
    return 0
}

STEP_PID=
step() {  # step SIGNAL SECONDS LOG CMD...: CMD under `timeout` (SIGNAL at the limit), output to LOG and stdout.
    # In the background + `wait`, so a signal to this script runs its traps at once (finish stops the step).
    local sig=$1 t=$2 log=$3
    shift 3
    (( t < 1 )) && t=1  # `timeout 0` would mean no limit
    timeout -s "$sig" -k 15 "$t" "$@" > >(tee "$log") 2>&1 &
    STEP_PID=$!
    wait "$STEP_PID"
    step_rc=$?
    STEP_PID=
}

finish() {
    local rc=$? i
    trap - EXIT INT TERM HUP
    [ -n "${SYNC_PID:-}" ] && kill "$SYNC_PID" 2>/dev/null
    if [ -n "$STEP_PID" ] && kill -0 "$STEP_PID" 2>/dev/null; then  # interrupted inside a step: stop it first
        kill -INT "$STEP_PID" 2>/dev/null
        for i in $(seq 20); do kill -0 "$STEP_PID" 2>/dev/null || break; sleep 0.5; done
        kill -TERM "$STEP_PID" 2>/dev/null
    fi
    copy_results
    cp "$OUT"/*.log "$OUT/gpu.txt" "$WORK/" 2>/dev/null
    tar -czf "$OUT/.gpu_check.tar.gz.tmp" --exclude='*.npz' -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null \
        && mv -f "$OUT/.gpu_check.tar.gz.tmp" "$OUT/gpu_check.tar.gz"
    rm -f "$OUT"/.*.tmp
    # The head of bench.md, the model table and retention (the kernel tables are in $OUT/bench.md): the device tool
    # shows only the last 12,000 characters of the output.
    [ -f "$OUT/bench.md" ] && awk 'BEGIN { p = 1 } /^## / { p = ($0 ~ /^## (Models|Accuracy)/) }
        p || /not measured|failed/' "$OUT/bench.md"
    echo "cuda tests rc=$test_rc bench rc=$bench_rc retention rc=$retention_rc ($(( SECONDS - START )) s); files in $OUT:"
    ls -la "$OUT"
    exit "$rc"
}
trap finish EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'echo "terminated" >&2; exit 143' TERM HUP

( while sleep 20; do copy_results; done ) >/dev/null 2>&1 &  # stdout not held open by a leftover sleep
SYNC_PID=$!

left() { echo $(( TOTAL_BUDGET - (SECONDS - START) )); }

retention_ok=1
RETENTION_PATH=$PYTHONPATH  # the wheels go on the retention step's path only: they must not shadow the image's
if ! "$PY" -c "import pydantic" 2>/dev/null; then  # packages (typing_extensions) under the tests and the bench
    if ls .whl/*.whl >/dev/null 2>&1; then
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl; then
            RETENTION_PATH="/tmp/site:$PYTHONPATH"
        else
            echo "WARNING: could not install the .whl/ wheels: the retention section (needs pydantic) will be skipped" >&2
            retention_ok=0
        fi
    else
        echo "WARNING: pydantic is missing and no .whl/ wheels were carried: the retention section (needs pydantic)" \
            "will be skipped (see docs/BENCHMARKS.md); everything else runs" >&2
        retention_ok=0
    fi
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || echo "no nvidia-smi"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  "$PY" -c "import pydantic; print('pydantic', pydantic.__version__)" 2>/dev/null || echo "pydantic: missing"
  "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>/dev/null || echo "pytest: missing"
} 2>&1 | tee "$OUT/gpu.txt"

echo "== CUDA tests (engine, kernels, quant) =="
t=$TEST_TIMEOUT; (( t > $(left) )) && t=$(left)
# SIGINT at the limit: pytest stops and still prints the failures it saw.
mapfile -t cuda_modules < <(for d in tests/engine tests/kernels tests/quant; do grep -l "mark.cuda" "$d"/test_*.py; done)
step INT "$t" "$OUT/cuda_tests.log" "$PY" -m pytest -p no:cacheprovider -m cuda -v -rfE --tb=short \
    --junitxml="$WORK/cuda_tests.xml" "${cuda_modules[@]}"
test_rc=$step_rc

echo "== benchmark =="
t=$BENCH_TIMEOUT; (( t > $(left) )) && t=$(left)
echo "bench timeout ${t}s (total budget ${TOTAL_BUDGET}s, $(( SECONDS - START ))s used)"
# shellcheck disable=SC2086  # BENCH_ARGS unquoted on purpose: split into options
step TERM "$t" "$OUT/bench.log" "$PY" -m qvggt.bench.run --out "$WORK/bench" --frames "$FRAMES" \
    --configs "$CONFIGS" --retention-checkpoint '' $BENCH_ARGS
bench_rc=$step_rc
copy_results

echo "== accuracy retention =="
t=$(left)
if (( retention_ok == 0 )); then
    reason="pydantic is missing on this machine (qvggt.config needs it) and no .whl/ wheels could be installed"
elif [ ! -f "$RETENTION_CKPT" ]; then
    reason="checkpoint $RETENTION_CKPT not found"
elif (( t < RETENTION_MIN_S )); then
    reason="only ${t}s of the ${TOTAL_BUDGET}s budget left (needs ${RETENTION_MIN_S}s)"
else
    reason=""
fi
if [ -n "$reason" ]; then
    step TERM 60 "$OUT/retention.log" "$PY" -m qvggt.bench.run --out "$WORK/bench" --configs "$CONFIGS" \
        --retention-skipped "$reason"
    retention_rc="skipped"
else
    echo "retention timeout ${t}s"
    step TERM "$t" "$OUT/retention.log" env PYTHONPATH="$RETENTION_PATH" "$PY" -m qvggt.bench.run \
        --out "$WORK/bench" --configs "$CONFIGS" --retention-only --retention-checkpoint "$RETENTION_CKPT" --retention-scenes "$RETENTION_SCENES"
    retention_rc=$step_rc
fi
exit $(( test_rc != 0 || bench_rc != 0 ))
