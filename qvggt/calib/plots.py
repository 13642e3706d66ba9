"""Figures of a ``StatsReport``: where heavy-tailed activations sit along depth, special vs patch tokens.

Uses ``matplotlib.figure.Figure`` with an explicit Agg canvas (never the global backend, never a window),
and writes every PNG atomically.

Figures (legend: colour = linear type qkv / proj / fc1 / fc2; solid circles = frame blocks, dashed squares =
global blocks; grey = layers outside the aggregator blocks, plotted at their order of appearance):

1. ``kurtosis_by_depth.png``: max over input channels of the EXCESS kurtosis, x = block index, one panel per
   token group (special, patch), symlog y.
2. ``outlier_ratio_by_depth.png``: max / median channel absmax, same layout, log y.
3. ``channel_absmax_worst.png``: per-channel absmax ``[C]`` of the layer with the largest max kurtosis,
   special vs patch tokens, log y.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from qvggt.calib.stats import StatsReport, parse_layer_name
from qvggt.io import atomic_open

__all__ = ["plot_stats"]

_LINEAR_COLORS = {"qkv": "C0", "proj": "C1", "fc1": "C2", "fc2": "C3"}
_KIND_STYLE = {"frame": ("-", "o"), "global": ("--", "s"), "other": (":", ".")}
_GROUP_COLORS = {"special": "C3", "patch": "C0", "all": "0.3"}


def _new_figure(figsize: tuple[float, float], dpi: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


def _panel_groups(report: StatsReport) -> list[str]:
    split = any("special" in layer.groups for layer in report.layers.values())
    return ["special", "patch"] if split else ["all"]


def _series(report: StatsReport, group: str, metric: str) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """(kind, linear) -> (x, y): x = block index (order of appearance for other layers), finite values only."""
    out: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    other_idx = 0
    for name, layer in report.layers.items():
        kind, block, linear = parse_layer_name(name)
        if kind == "other":
            x, other_idx = other_idx, other_idx + 1
        else:
            x = block
        stats = layer.groups.get(group) or layer.groups.get("all")
        if stats is None:
            continue
        y = stats.summary()[metric]
        if not math.isfinite(y):
            continue
        xs, ys = out.setdefault((kind, linear), ([], []))
        xs.append(float(x))
        ys.append(float(y))
    return out


def _order_key(key: tuple[str, str]) -> tuple[int, int, str]:
    kind, linear = key
    lins, kinds = list(_LINEAR_COLORS), list(_KIND_STYLE)
    return (lins.index(linear) if linear in lins else len(lins), kinds.index(kind), linear)


def _depth_figure(report: StatsReport, metric: str, ylabel: str, yscale: str, title: str, dpi: int) -> Any:
    from matplotlib.ticker import MaxNLocator

    groups = _panel_groups(report)
    fig = _new_figure((6.0 * len(groups), 4.2), dpi)
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    for ax, group in zip(axes, groups, strict=True):
        series = _series(report, group, metric)
        # Legend order: qkv, proj, fc1, fc2 (execution order), frame before global, then anything else.
        for kind, linear in sorted(series, key=_order_key):
            xs, ys = series[(kind, linear)]
            ls, marker = _KIND_STYLE.get(kind, _KIND_STYLE["other"])
            color = _LINEAR_COLORS.get(linear, "0.5") if kind != "other" else "0.5"
            order = np.argsort(xs)
            ax.plot(
                np.asarray(xs)[order],
                np.asarray(ys)[order],
                ls=ls,
                marker=marker,
                ms=3.5,
                lw=1.2,
                color=color,
                label=f"{kind} {linear}",
            )
        if yscale == "symlog":
            ax.set_yscale("symlog", linthresh=1.0)
        else:
            ax.set_yscale(yscale)
        ax.set_title(f"{group} tokens", fontsize=10)
        ax.set_xlabel("block index")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, ncol=2)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=11)
    return fig


def _channel_figure(report: StatsReport, name: str, dpi: int) -> Any:
    layer = report.layers[name]
    groups = [g for g in ("special", "patch") if g in layer.groups] or ["all"]
    fig = _new_figure((9.0, 4.0), dpi)
    ax = fig.add_subplot(1, 1, 1)
    channels = np.arange(layer.in_features)
    for g in groups:
        s = layer.groups[g]
        summ = s.summary()
        amax = np.where(s.absmax > 0, s.absmax, np.nan)  # log axis: zeros would vanish anyway
        ax.plot(
            channels,
            amax,
            lw=0.8,
            color=_GROUP_COLORS[g],
            label=f"{g} ({s.count} tokens, max kurt {summ['max_kurtosis']:.3g}, ratio {summ['outlier_ratio']:.3g})",
        )
        if np.isfinite(amax).any():
            top = int(np.nanargmax(amax))
            ax.annotate(f"ch {top}", (top, amax[top]), fontsize=7, color=_GROUP_COLORS[g])
    ax.set_yscale("log")
    ax.set_xlabel("input channel")
    ax.set_ylabel("absmax |x|")
    ax.set_title(f"per-channel absmax of the input of {name}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_stats(report: StatsReport, out_dir: str | Path, dpi: int = 110) -> list[Path]:
    """Write the three figures described in the module docstring into ``out_dir``; returns their paths.

    Layers without special/patch groups are drawn from their "all" group. The worst layer (figure 3) is the
    one with the largest max excess kurtosis over its special and patch groups.
    """
    if not report.layers:
        raise ValueError("the report has no layers to plot")
    out_dir = Path(out_dir)
    model = report.meta.get("model", "model")
    n = report.meta.get("num_batches", "?")
    figures = [
        (
            "kurtosis_by_depth.png",
            _depth_figure(
                report,
                "max_kurtosis",
                "max excess kurtosis over channels",
                "symlog",
                f"{model}: input kurtosis per layer ({n} batches)",
                dpi,
            ),
        ),
        (
            "outlier_ratio_by_depth.png",
            _depth_figure(
                report,
                "outlier_ratio",
                "max / median channel absmax",
                "log",
                f"{model}: channel outlier ratio per layer ({n} batches)",
                dpi,
            ),
        ),
        ("channel_absmax_worst.png", _channel_figure(report, report.worst_layer("max_kurtosis"), dpi)),
    ]
    return [_save(fig, out_dir / fname, dpi) for fname, fig in figures]
