"""Calibration tooling: streaming activation statistics of layer inputs and their plots.

- ``qvggt.calib.stats``: ``ActivationStats`` (forward pre-hooks, bounded memory), ``collect_stats`` ->
  ``StatsReport`` (per layer and token group "special" / "patch" / "all": per-channel absmax, mean, std,
  skewness, excess kurtosis, |x| and token-norm histograms; ``save`` / ``load``).
- ``qvggt.calib.plots``: ``plot_stats`` (kurtosis and outlier ratio along depth, worst layer's channel
  profile). Imported lazily: ``import qvggt.calib`` and ``qvggt.calib.stats`` never import matplotlib.
"""

from __future__ import annotations

from typing import Any

from qvggt.calib.stats import (
    ActivationStats,
    GroupStats,
    LayerStats,
    LogBins,
    Moments,
    StatsReport,
    TokenLayout,
    collect_stats,
)

__all__ = [
    "ActivationStats",
    "GroupStats",
    "LayerStats",
    "LogBins",
    "Moments",
    "StatsReport",
    "TokenLayout",
    "collect_stats",
    "plot_stats",
]


def __getattr__(name: str) -> Any:
    # plot_stats pulls in matplotlib: load it only when asked for.
    if name == "plot_stats":
        from qvggt.calib.plots import plot_stats

        return plot_stats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
