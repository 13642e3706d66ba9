"""Do a model's linear inputs have the heavy tails QuantVGGT describes? One table across models.

QuantVGGT attributes VGGT-1B's quantization difficulty to heavy-tailed activations carried by the data-independent
camera and register tokens. This module collects the streaming input statistics (``qvggt.calib.stats``) of the
aggregator's qkv / proj / fc1 / fc2 for several models on the same calibration-split scenes and summarises, per
linear type and token group (special = camera + registers, patch): the median over layers of the outlier ratio
(largest / median channel absmax) and the largest and mean excess kurtosis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qvggt.calib.stats import StatsReport, collect_stats

__all__ = ["LINEARS", "heavy_tail_rows", "heavy_tail_table", "measure_heavy_tails"]

LINEARS = ("qkv", "proj", "fc1", "fc2")
GROUPS = ("special", "patch")


def heavy_tail_rows(name: str, report: StatsReport) -> list[dict]:
    """Rows (model, linear, group, layers, median outlier ratio, max / mean excess kurtosis) of one report."""
    rows = []
    for linear in LINEARS:
        layers = [s for s in report.layers.values() if s.linear == linear]
        for group in GROUPS:
            sums = [layer.summary()[group] for layer in layers if group in layer.groups]
            if not sums:
                continue
            ratios = [s["outlier_ratio"] for s in sums if math.isfinite(s["outlier_ratio"])]
            kmax = [s["max_kurtosis"] for s in sums if math.isfinite(s["max_kurtosis"])]
            kmean = [s["mean_kurtosis"] for s in sums if math.isfinite(s["mean_kurtosis"])]
            rows.append({
                "model": name, "linear": linear, "group": group, "layers": len(sums),
                "median_outlier_ratio": float(np.median(ratios)) if ratios else math.nan,
                "max_kurtosis": float(max(kmax)) if kmax else math.nan,
                "mean_kurtosis": float(np.mean(kmean)) if kmean else math.nan,
            })  # fmt: skip
    return rows


def heavy_tail_table(rows: list[dict]) -> str:
    """Markdown table of ``heavy_tail_rows`` output (several models side by side)."""
    lines = [
        (
            "| model | linear input | tokens | layers | median max/median channel absmax | max excess kurtosis "
            "| mean excess kurtosis |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['linear']} | {r['group']} | {r['layers']} | {r['median_outlier_ratio']:.1f} "
            f"| {r['max_kurtosis']:.1f} | {r['mean_kurtosis']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def measure_heavy_tails(
    models: dict[str, nn.Module], batches: Iterable[torch.Tensor], out_dir: str | Path, plots: bool = True
) -> list[dict]:
    """Collect, save (``out_dir/<model>/``) and plot each model's statistics on the same ``batches``; returns the
    rows of the comparison table (also written to ``out_dir/heavy_tails.md``)."""
    from qvggt.io import atomic_path

    out_dir = Path(out_dir)
    batches = list(batches)  # every model sees the same scenes
    rows: list[dict] = []
    for name, model in models.items():
        report = collect_stats(model, batches)
        folder = out_dir / name.replace("/", "_")
        report.save(folder)
        if plots:
            from qvggt.calib.plots import plot_stats  # matplotlib only when plots are asked for

            plot_stats(report, folder / "plots")
        rows += heavy_tail_rows(name, report)
    with atomic_path(out_dir / "heavy_tails.md") as tmp:
        tmp.write_text(heavy_tail_table(rows))
    return rows
