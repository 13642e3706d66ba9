#!/usr/bin/env bash
# Method comparison on the trained small model (CPU): quantize with each method at W8A8 / W4A8 / W4A4, then one
# evaluation of all of them against the FP model on the same held-out synthetic scenes, then the markdown table.
#   OUT=runs/methods_stress BASE=runs/stress/model.safetensors bash scripts/compare_methods.sh   # stress variant
#   METHODS="rtn quarot" BITS="4 4" bash scripts/compare_methods.sh                               # a subset
set -euo pipefail
Q=${OUT:-runs/methods}
BASE=${BASE:-models/small/model.safetensors}
METHODS=${METHODS:-rtn smoothquant quarot gptq quantvggt}
BITS=${BITS:-8 8,4 8,4 4}
SCENES=${SCENES:-16}
compare=()
IFS=, read -ra bitlist <<< "$BITS"
for m in $METHODS; do
  for b in "${bitlist[@]}"; do
    set -- $b
    .venv/bin/qvggt quantize --method $m --wbits $1 --abits $2 --model $BASE --out $Q/$m-w$1a$2 > /dev/null
    compare+=(--compare $Q/$m-w$1a$2/model.safetensors)
  done
done
rm -rf $Q/eval  # eval refuses a folder holding another evaluation
.venv/bin/qvggt eval --model $BASE "${compare[@]}" --scenes $SCENES --frames 4 --out $Q/eval > /dev/null
.venv/bin/python scripts/method_table.py $Q/eval/metrics.json
