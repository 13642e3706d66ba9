"""Markdown tables of the calibration-stability experiment (scripts/calibration_stability.sh, issue #5).

Usage: python scripts/calibration_stability.py runs/calib_stability/small/eval/metrics.json [more metrics.json ...]
Each metrics.json is one ``qvggt eval`` of a float model (its first model) against quantized models named
``<mode>-s<seed>/model``. Printed: mean and sample standard deviation over the seeds of each calibration mode, for
task metrics (pose AUC@30, depth AbsRel) and fidelity to the float model (pose AUC@30 with its cameras as ground
truth, relative L2 of the pose encoding and of depth); then every seed's row.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

# (column title, metrics key, format of values and means, format of standard deviations)
COLUMNS = (
    ("pose AUC@30", "pose_auc@30", "{:.2f}", "{:.2f}"),
    ("depth AbsRel", "depth_abs_rel", "{:.5f}", "{:.1e}"),
    ("fid pose AUC@30", "fid_pose_auc@30", "{:.1f}", "{:.1f}"),
    ("rel L2 pose enc", "fid_rel_l2_pose_enc", "{:.2e}", "{:.1e}"),
    ("rel L2 depth", "fid_rel_l2_depth", "{:.2e}", "{:.1e}"),
)
NAME = re.compile(r"(?P<mode>[a-z]+)-s(?P<seed>\d+)/model")


def _mean_std(values: list[float], fmt: str, std_fmt: str) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(values))} ± {std_fmt.format(std)}"


def summary_rows(doc: dict) -> tuple[str, dict, dict[str, list[tuple[int, dict]]]]:
    """The float model's name and metrics, and the quantized models' metrics grouped by mode (seed order)."""
    agg = doc["aggregate"]
    base = next(iter(agg))
    by_mode: dict[str, list[tuple[int, dict]]] = {}
    for name in doc["comparison"]:
        match = NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{name}: not a <mode>-s<seed>/model name from scripts/calibration_stability.sh")
        by_mode.setdefault(match["mode"], []).append((int(match["seed"]), agg[name]))
    return base, agg[base], {mode: sorted(rows, key=lambda r: r[0]) for mode, rows in by_mode.items()}


def main(paths: list[str]) -> None:
    header = "| " + " | ".join(["model", "calibration", "seeds", *(c[0] for c in COLUMNS)]) + " |"
    rule = "|" + "---|" * (3 + len(COLUMNS))
    docs = [summary_rows(json.loads(Path(p).read_text())) for p in paths]
    print(f"W4A4 quantvggt; mean ± standard deviation over seeds\n\n{header}\n{rule}")
    for base, fp, by_mode in docs:
        fp_cells = [fmt.format(fp[key]) for _, key, fmt, _ in COLUMNS[:2]]
        print(f"| {base} | FP | - | {' | '.join(fp_cells)} | - | - | - |")
        for mode, rows in by_mode.items():
            cells = [_mean_std([m[key] for _, m in rows], fmt, std_fmt) for _, key, fmt, std_fmt in COLUMNS]
            print(f"| {base} | {mode} | {len(rows)} | {' | '.join(cells)} |")
    print(f"\nPer seed\n\n{header}\n{rule}")
    for base, _, by_mode in docs:
        for mode, rows in by_mode.items():
            for seed, m in rows:
                cells = [fmt.format(m[key]) for _, key, fmt, _ in COLUMNS]
                print(f"| {base} | {mode} | {seed} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
