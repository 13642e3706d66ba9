"""Issue #6's method-by-bit-width table: every method at W8A8 / W6A6 / W4A8 / W4A4 plus quantvggt ablations, on one
base model, evaluated in one ``qvggt eval`` run against ground truth and the float model.

Usage: python scripts/method_grid.py BASE OUT [--scenes 16] [--calib-manifest runs/.../manifest.json]
Writes OUT/<name>/model.safetensors per config (reused when present), OUT/eval/ and prints the markdown table:
task metrics (pose AUC@30/@5, depth AbsRel, Chamfer), the paired bootstrap 95% interval of the AbsRel change
against FP, and fidelity to the FP model (pose AUC@30 with its cameras as ground truth, pose-encoding rel L2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from qvggt.quant.command import run_quantize

METHODS = ("rtn", "smoothquant", "quarot", "gptq", "quantvggt")
BITS = ((8, 8), (6, 6), (4, 8), (4, 4))
# quantvggt ablations at W4A4 (issue #6: without rotation, smoothing, special-token handling, reconstruction) and
# one variant: qkv/fc1 inputs rotated online too (the paper's full rotation).
ABLATIONS = {
    "quantvggt-norot": {"head_rotation": False, "fc2_rotation_block": 0},
    "quantvggt-nosmooth": {"smooth": False},
    "quantvggt-nospecial": {"special_token_abits": None},
    "quantvggt-norecon": {"reconstruct": False},
    "quantvggt+lnrot": {"norm_input_rotation": True},
}


def configs() -> list[tuple[str, str, int, int, dict]]:
    out = [(f"{m}-w{w}a{a}", m, w, a, {}) for m in METHODS for w, a in BITS]
    out += [(f"{name}-w4a4", "quantvggt", 4, 4, opts) for name, opts in ABLATIONS.items()]
    return out


def fmt_interval(c: dict) -> str:
    return f"{c['mean_diff']:+.1e} [{c['low']:+.1e}, {c['high']:+.1e}]"


def table(metrics: Path) -> str:
    doc = json.loads(metrics.read_text())
    agg, comp = doc["aggregate"], doc["comparison"]
    fp_name = next(iter(agg))
    fp = agg[fp_name]
    rows = [
        (
            "| config | pose AUC@30 | pose AUC@5 | depth AbsRel | AbsRel - FP [95% CI] | Chamfer | fid pose AUC@30 "
            "| rel L2 pose enc |"
        ),
        "|---|---|---|---|---|---|---|---|",
        (
            f"| FP | {fp['pose_auc@30']:.2f} | {fp['pose_auc@5']:.2f} | {fp['depth_abs_rel']:.5f} | - "
            f"| {fp['pm_chamfer']:.4f} | - | - |"
        ),
    ]
    for name in comp:
        m = agg[name]
        rows.append(
            f"| {name.split('/')[0]} | {m['pose_auc@30']:.2f} | {m['pose_auc@5']:.2f} | {m['depth_abs_rel']:.5f} "
            f"| {fmt_interval(comp[name]['depth_abs_rel'])} | {m['pm_chamfer']:.4f} | {m['fid_pose_auc@30']:.1f} "
            f"| {m['fid_rel_l2_pose_enc']:.2e} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("out")
    p.add_argument("--scenes", type=int, default=16)
    p.add_argument("--calib-manifest", default=None, help="a `qvggt calibrate` manifest (default: 8 random scenes)")
    args = p.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    compare = []
    for name, method, w, a, opts in configs():
        dest = out / name
        if not (dest / "model.safetensors").is_file():
            t = time.perf_counter()
            run_quantize(method, w, a, dest, args.base, calib_manifest=args.calib_manifest, options=opts or None)
            print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        compare += ["--compare", str(dest / "model.safetensors")]
    shutil.rmtree(out / "eval", ignore_errors=True)  # eval refuses a folder holding another evaluation
    qvggt = Path(sys.executable).with_name("qvggt")
    cmd = [str(qvggt), "eval", "--model", args.base, *compare, "--scenes", str(args.scenes), "--frames", "4"]
    subprocess.run([*cmd, "--out", str(out / "eval")], check=True, stdout=subprocess.DEVNULL)
    print(table(out / "eval" / "metrics.json"))


if __name__ == "__main__":
    main()
