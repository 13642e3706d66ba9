#!/usr/bin/env bash
# One prepared GPU check for a lent H100/H200 (at most 7 minutes: TOTAL_BUDGET seconds, the bench gets what the
# tests leave): CUDA kernel and engine tests (incl. the LayerNorm -> Hadamard -> quant stage and CUDA-graph replay
# vs eager), then the benchmark (fixed tile configs, no autotune sweeps; engine configs replay CUDA graphs,
# w8a8-fp8-eager is the same config without them, run last). Results land under $OUT (default runs/gpu_check);
# the bench rewrites bench.json / bench.md after every measurement, so a timed-out bench keeps what it measured.
#
#   bash scripts/gpu_check.sh                 # full: tests + bench at 1, 8, 32, 100 frames, all configs
#   FRAMES=8,32 CONFIGS=published,w8a8-fp8 bash scripts/gpu_check.sh
#
# The GPU machine has torch and triton but nothing can be installed there from a registry: the core needs only
# torch, numpy, triton and safetensors; pydantic (the model config) can travel as wheels in .whl/ (see
# docs/BENCHMARKS.md for the command that downloads them).
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
FRAMES=${FRAMES:-1,8,32,100}
CONFIGS=${CONFIGS:-all}
TOTAL_BUDGET=${TOTAL_BUDGET:-410}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-330}
START=$SECONDS
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}

if ! "$PY" -c "import pydantic" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site:$PYTHONPATH" || { echo "could not install .whl/ wheels" >&2; exit 2; }
    else
        echo "pydantic is missing and no .whl/ wheels were carried: see docs/BENCHMARKS.md" >&2
        exit 2
    fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

echo "== CUDA tests =="
timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/kernels tests/quant tests/engine \
    2>&1 | tee "$OUT/cuda_tests.log"
test_rc=${PIPESTATUS[0]}

echo "== benchmark =="
left=$(( TOTAL_BUDGET - (SECONDS - START) ))
(( left < BENCH_TIMEOUT )) && BENCH_TIMEOUT=$left
(( BENCH_TIMEOUT < 1 )) && BENCH_TIMEOUT=1  # `timeout 0` would mean no limit
echo "bench timeout ${BENCH_TIMEOUT}s (total budget ${TOTAL_BUDGET}s, $(( SECONDS - START ))s used)"
timeout "$BENCH_TIMEOUT" "$PY" -m qvggt.cli bench --out "$OUT/bench" --frames "$FRAMES" --configs "$CONFIGS" \
    2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

[ -f "$OUT/bench/bench.md" ] && cat "$OUT/bench/bench.md"
echo "cuda tests rc=$test_rc bench rc=$bench_rc"
exit $(( test_rc != 0 || bench_rc != 0 ))
