#!/usr/bin/env bash
# Issue #6's GPU measurement: wall time and peak device memory of calibration + quantization of `vggt-1b` (name-seeded
# weights: the compute of the released model, not its accuracy) with the default quantvggt W4A4 (NFDS-free: the
# first 8 calibration-split scenes x 4 frames at the preset's 518x392; reconstruction within its 40 s budget).
# Target: under 30 minutes and 16 GB. Run as its own device command after scripts/gpu_check.sh (about 3-5 minutes):
#
#   OUT=$OUT bash scripts/gpu_quantize_1b.sh
#
# Needs pydantic (the calibration data comes from the params config): `make gpu-wheels` here, carry .whl/ there
# (typer is on the GPU image). $OUT gets 2 flat files:
# quantize_1b.log and quantize_1b.tar.gz (the quantize output folder, written under WORK outside $OUT, without its
# checkpoint weights: the device tool returns few files and the quantized vggt-1b is large).
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
WORK=${WORK:-/tmp/qvggt_quantize_1b}
METHOD=${METHOD:-quantvggt}
TIMEOUT=${TIMEOUT:-420}
PRESET=${PRESET:-vggt-1b}  # PRESET=tiny DEVICE=cpu: a dry run of the script itself on any machine
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
if ! "$PY" -c "import pydantic, typer" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
    "$PY" -c "import pydantic, typer" || {
        echo "pydantic or typer is missing and the .whl/ wheels did not provide it: run \`make gpu-wheels\` and carry" \
            ".whl/ (the device tool's carry)" >&2
        exit 2
    }
fi
CKPT=${CKPT:-/tmp/$PRESET-name-seeded.safetensors}
if [ ! -f "$CKPT" ]; then
    "$PY" - "$CKPT" "$PRESET" <<'PYEOF'
import sys

import torch

from qvggt.model import build_model, get_preset, save_checkpoint
from qvggt.model.init import fill_name_seeded_

model = fill_name_seeded_(build_model(get_preset(sys.argv[2]), device="meta"))
save_checkpoint(model, sys.argv[1], dtype=torch.float16)
PYEOF
fi
rm -rf "$WORK/quantize_1b"
mkdir -p "$WORK"
timeout "$TIMEOUT" "$PY" -m qvggt.cli quantize --model "$CKPT" --method "$METHOD" --wbits 4 --abits 4 \
    --device "$DEVICE" --out "$WORK/quantize_1b" 2>&1 | tee "$OUT/quantize_1b.log"
rc=${PIPESTATUS[0]}
[ -d "$WORK/quantize_1b" ] && tar -czf "$OUT/quantize_1b.tar.gz" --exclude='*.safetensors' --exclude='*.pt' \
    --exclude='*.pth' --exclude='*.npz' -C "$WORK" quantize_1b
exit "$rc"
