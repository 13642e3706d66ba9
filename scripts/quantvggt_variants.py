"""quantvggt variants (method options) and the strongest baselines on one model: quantize each at W4A8 and W4A4 on
the default calibration set, evaluate all against the FP model on the same held-out scenes, print the markdown
table (scripts/method_table.py) and each quantization's wall time.

Usage: python scripts/quantvggt_variants.py [BASE] [OUT] [SET] [CALIB_MANIFEST] [SCENES]
    (defaults: models/small/model.safetensors runs/variants options, the first 8 calibration scenes, 16 scenes)
    SET options: quantvggt's options and QuaRot + GPTQ; SET recon: quantvggt (and quantvggt + GPTQ) with /
    without block-wise reconstruction, with the special-token-weighted loss (tokw1), and quarot; SET holdout:
    reconstruction's acceptance test on held-out batches (the default, recon_holdout=0.25) against the test on the
    training batches (recon_holdout=0), seeds 0-3, and no reconstruction (docs/QUANTIZATION.md, "Held-out
    acceptance").
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from qvggt.config import load_config
from qvggt.eval.command import run_eval
from qvggt.quant.command import run_quantize

SETS: dict[str, dict[str, tuple[str, dict]]] = {
    "options": {
        "quantvggt": ("quantvggt", {}),
        "quantvggt+gptq": ("quantvggt", {"gptq": True}),
        "quantvggt+lnrot": ("quantvggt", {"norm_input_rotation": True}),
        "quantvggt+lnrot+gptq": ("quantvggt", {"norm_input_rotation": True, "gptq": True}),
        "quarot+gptq": ("gptq", {"rotate": True}),
    },
    "recon": {
        "quantvggt": ("quantvggt", {}),
        "quantvggt-norecon": ("quantvggt", {"reconstruct": False}),
        "quantvggt+tokw1": ("quantvggt", {"recon_special_weight": 1.0}),
        "quantvggt+gptq": ("quantvggt", {"gptq": True}),  # reconstruction off by default with GPTQ
        "quantvggt+gptq+recon": ("quantvggt", {"gptq": True, "reconstruct": True}),
        "quarot": ("quarot", {}),
    },
    "holdout": {
        "quantvggt-norecon": ("quantvggt", {"reconstruct": False}),
        **{f"quantvggt-trainaccept-s{k}": ("quantvggt", {"recon_seed": k, "recon_holdout": 0.0}) for k in range(4)},
        **{f"quantvggt-s{k}": ("quantvggt", {"recon_seed": k}) for k in range(4)},
    },
}


def main(
    base: str = "models/small/model.safetensors",
    out: str = "runs/variants",
    which: str = "options",
    calib_manifest: str | None = None,
    scenes: str = "16",
) -> None:
    data = load_config("params.yaml").data
    root = Path(out)
    compare = []
    for name, (method, options) in SETS[which].items():
        for wbits, abits in ((4, 8), (4, 4)):
            dest = root / f"{name}-w{wbits}a{abits}"
            t = time.perf_counter()
            run_quantize(method, wbits, abits, dest, base, data=data, calib_manifest=calib_manifest, options=options)
            compare.append(str(dest / "model.safetensors"))
            print(f"{name} W{wbits}A{abits}: quantized in {time.perf_counter() - t:.1f} s", flush=True)
    shutil.rmtree(root / "eval", ignore_errors=True)
    run_eval(base, compare, "synthetic:eval", root / "eval", frames=4, scenes=int(scenes), data=data, progress=False)
    subprocess.run([sys.executable, "scripts/method_table.py", str(root / "eval" / "metrics.json")], check=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
