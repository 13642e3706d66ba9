"""plot_stats writes three valid, non-blank PNGs, from a collected report and from one loaded from disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from qvggt.calib.plots import plot_stats
from qvggt.calib.stats import ActivationStats, StatsReport, TokenLayout, collect_stats
from qvggt.model import build_model, get_preset

NAMES = {"kurtosis_by_depth.png", "outlier_ratio_by_depth.png", "channel_absmax_worst.png"}


def _check_png(path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB"))
    assert px.shape[0] > 100 and px.shape[1] > 200
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 10  # lines, text and colours, not a blank canvas
    assert (px < 128).any()


@pytest.fixture(scope="module")
def report() -> StatsReport:
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    g = torch.Generator().manual_seed(0)
    return collect_stats(model, [torch.rand(1, 2, 3, 28, 28, generator=g) for _ in range(2)])


def test_plots_from_collected_and_loaded_reports(report, tmp_path) -> None:
    paths = plot_stats(report, tmp_path / "figs", dpi=50)
    assert {p.name for p in paths} == NAMES and all(p.parent == tmp_path / "figs" for p in paths)
    for p in paths:
        _check_png(p)
    assert not [p for p in (tmp_path / "figs").iterdir() if p.name.endswith(".tmp")]  # atomic writes cleaned up

    report.save(tmp_path / "stats")
    again = plot_stats(StatsReport.load(tmp_path / "stats"), tmp_path / "figs2", dpi=50)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_plots_for_layers_without_token_groups(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    with ActivationStats().attach(model, ["0", "2"]) as stats:
        model(torch.randn(20, 8) * torch.logspace(-2, 2, 8))
    rep = stats.report()
    assert set(rep["0"].groups) == {"all"}
    for p in plot_stats(rep, tmp_path, dpi=50):
        _check_png(p)

    split = nn.Sequential(nn.Linear(8, 8))
    with ActivationStats(layout=TokenLayout(1, 4)).attach(split, ["0"]) as stats:
        split(torch.randn(3, 8, 8))
    for p in plot_stats(stats.report(), tmp_path / "split", dpi=50):
        _check_png(p)
