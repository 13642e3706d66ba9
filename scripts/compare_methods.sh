#!/usr/bin/env bash
# Method comparison on the trained small model (CPU): quantize with each method at W8A8 / W4A8 / W4A4, then one
# evaluation of all of them against the FP model on the same held-out synthetic scenes.
set -euo pipefail
Q=${OUT:-runs/methods}
BASE=${BASE:-models/small/model.safetensors}
for m in rtn smoothquant quantvggt; do
  for b in "8 8" "4 8" "4 4"; do
    set -- $b
    .venv/bin/qvggt quantize --method $m --wbits $1 --abits $2 --model $BASE --out $Q/$m-w$1a$2 > /dev/null
  done
done
.venv/bin/qvggt eval --model $BASE \
  $(for m in rtn smoothquant quantvggt; do for b in w8a8 w4a8 w4a4; do echo --compare $Q/$m-$b/model.safetensors; done; done) \
  --scenes 16 --frames 4 --out $Q/eval
