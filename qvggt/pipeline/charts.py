"""The comparison chart across quantized configs: one panel per headline metric, one bar per model (the float base
first), from an evaluation's ``metrics.json``. Logged with every MLflow run of a flow, so each run shows where it
stands among its siblings."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qvggt.io import atomic_path

__all__ = ["HEADLINE_METRICS", "comparison_chart"]

# (metric in metrics.json, panel title, which way is better)
HEADLINE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("pose_auc@30", "pose AUC@30 (higher is better)", "higher"),
    ("fid_pose_auc@30", "pose AUC@30 against the float model's poses", "higher"),
    ("depth_abs_rel", "depth AbsRel (lower is better)", "lower"),
    ("pm_chamfer", "point-map Chamfer (lower is better)", "lower"),
    ("fid_rel_l2_depth", "depth rel. L2 vs the float model (lower is better)", "lower"),
)


def comparison_chart(metrics_path: str | Path, out_png: str | Path, dpi: int = 110) -> Path:
    """Draw the headline metrics of every model in ``metrics_path`` side by side; returns ``out_png`` (written
    atomically). Metrics a model lacks (e.g. fidelity for the reference itself) are left out of its panel."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a worker
    import matplotlib.pyplot as plt

    doc = json.loads(Path(metrics_path).read_text())
    models: list[str] = list(doc["models"])
    aggregate: dict[str, dict[str, float]] = doc["aggregate"]
    panels = [m for m in HEADLINE_METRICS if any(m[0] in aggregate[name] for name in models)]
    if not panels:
        raise ValueError(f"{metrics_path} holds none of the headline metrics {[m[0] for m in HEADLINE_METRICS]}")
    labels = [name.split("/")[0] for name in models]  # "rtn-w4a4/model" -> "rtn-w4a4"
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, title, _better) in zip(axes[0], panels, strict=True):
        values = [aggregate[name].get(key, math.nan) for name in models]
        colors = ["0.55" if i == 0 else f"C{i}" for i in range(len(models))]  # grey: the float reference
        ax.bar(range(len(models)), [0.0 if math.isnan(v) else v for v in values], color=colors)
        for i, v in enumerate(values):
            ax.annotate("n/a" if math.isnan(v) else f"{v:.3g}", (i, 0 if math.isnan(v) else v), ha="center",
                        va="bottom", fontsize=8)  # fmt: skip
        ax.set_xticks(range(len(models)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{len(models) - 1} quantized configs against {labels[0]}", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return out_png
