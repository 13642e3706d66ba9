"""Markdown table of a ``qvggt eval --compare`` run of quantized models (scripts/compare_methods.sh).

Usage: python scripts/method_table.py runs/methods/eval/metrics.json
Rows: every compared model named ``<method>-w<W>a<A>`` (its output folder); columns: fidelity to the FP model
(pose AUC@30 with the FP cameras as ground truth, relative L2 of pose encoding, depth and point map) and task
metrics against ground truth (depth AbsRel, Chamfer).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    doc = json.loads(Path(path).read_text())
    agg = doc["aggregate"]
    fp_name = next(iter(agg))
    fp = agg[fp_name]
    print(f"FP ({fp_name}): depth AbsRel {fp['depth_abs_rel']:.4f}, Chamfer {fp['pm_chamfer']:.4f}\n")
    print(
        "| method | bits | fid pose AUC@30 | rel L2 pose enc | rel L2 depth | rel L2 points | depth AbsRel | Chamfer |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in doc["comparison"]:
        m = agg[name]
        method, bits = name.split("/")[0].rsplit("-", 1)
        print(
            f"| {method} | {bits.upper()} | {m['fid_pose_auc@30']:.1f} | {m['fid_rel_l2_pose_enc']:.2e} "
            f"| {m['fid_rel_l2_depth']:.2e} | {m['fid_rel_l2_world_points']:.2e} | {m['depth_abs_rel']:.4f} "
            f"| {m['pm_chamfer']:.4f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
