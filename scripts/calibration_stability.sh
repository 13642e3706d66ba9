#!/usr/bin/env bash
# Calibration stability (issue #5): W4A4 quantvggt calibrated on `random` and `nfds` manifests drawn with 5 seeds
# each, for the trained small model and the outlier-stress variant; one evaluation per base model (all ten quantized
# models as --compare, same held-out scenes), then the markdown tables (scripts/calibration_stability.py).
#   bash scripts/calibration_stability.sh                      # ~10 min on 2 cores
#   SEEDS="0 1" SCENES=8 OUT=runs/stab_quick bash scripts/calibration_stability.sh
#   CODE=a05187f bash scripts/calibration_stability.sh         # qvggt as of that commit (git archive, PYTHONPATH)
#   QUANT_ARGS="--recon-time-budget 0" bash ...                # extra `qvggt quantize` flags (0: reproducible)
# The stress variant must exist first: qvggt stress-model --out runs/stress/model.safetensors
set -euo pipefail
OUT=${OUT:-runs/calib_stability}
SEEDS=${SEEDS:-0 1 2 3 4}
MODES=${MODES:-random nfds}
SCENES=${SCENES:-32}
BASES=${BASES:-small=models/small/model.safetensors stress=runs/stress/model.safetensors}
read -r -a QUANT_ARGS <<< "${QUANT_ARGS:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
Q=.venv/bin/qvggt
if [[ -n ${CODE:-} ]]; then
  # Pin the package (quantize's defaults change as methods grow) without touching the working tree.
  rm -rf $OUT/src && mkdir -p $OUT/src
  git archive "$CODE" qvggt | tar -x -C $OUT/src
  export PYTHONPATH=$(realpath $OUT/src)${PYTHONPATH:+:$PYTHONPATH}
  .venv/bin/python -P -c "import qvggt; print(\"qvggt from\", qvggt.__file__)"
fi
metrics=()
for base in $BASES; do
  name=${base%%=*} ckpt=${base#*=}
  dir=$OUT/$name
  compare=()
  for mode in $MODES; do
    for seed in $SEEDS; do
      # NFDS reads the model's deep-layer statistics, so each base model gets its own manifests.
      $Q calibrate --mode $mode --seed $seed --model $ckpt --out $dir/calib-$mode-s$seed > /dev/null
      $Q quantize --method quantvggt --wbits 4 --abits 4 --model $ckpt \
        --calib-manifest $dir/calib-$mode-s$seed/manifest.json --out $dir/$mode-s$seed "${QUANT_ARGS[@]}" > /dev/null
      compare+=(--compare $dir/$mode-s$seed/model.safetensors)
    done
  done
  rm -rf $dir/eval  # eval refuses a folder holding another evaluation
  $Q eval --model $ckpt "${compare[@]}" --scenes $SCENES --frames 4 --out $dir/eval > /dev/null
  metrics+=($dir/eval/metrics.json)
done
if [[ -n ${CODE:-} ]]; then echo "code: qvggt at $(git rev-parse --short "$CODE")"; else
  echo "code: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- qvggt || echo ' with uncommitted changes in qvggt/')"; fi
.venv/bin/python scripts/calibration_stability.py "${metrics[@]}"
