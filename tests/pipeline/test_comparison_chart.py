"""The comparison chart across configs: a PNG from an evaluation's metrics.json, a clear error without metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qvggt.pipeline.charts import comparison_chart


def _metrics(tmp: Path, aggregate: dict) -> Path:
    path = tmp / "metrics.json"
    path.write_text(json.dumps({"models": list(aggregate), "aggregate": aggregate, "comparison": {}}))
    return path


def test_chart_is_a_png_with_every_model(tmp_path: Path) -> None:
    aggregate = {
        "small/model": {"pose_auc@30": 40.0, "depth_abs_rel": 0.11, "pm_chamfer": 0.07},
        "rtn-w4a4/model": {"pose_auc@30": 20.0, "depth_abs_rel": 0.3, "pm_chamfer": 0.2, "fid_rel_l2_depth": 0.5},
        "quantvggt-w4a4/model": {"pose_auc@30": 35.0, "depth_abs_rel": math.nan, "fid_rel_l2_depth": 0.1},
    }
    png = comparison_chart(_metrics(tmp_path, aggregate), tmp_path / "report" / "comparison.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert [p.name for p in png.parent.iterdir()] == ["comparison.png"]  # no temp file left beside it


def test_chart_without_headline_metrics_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="none of the headline metrics"):
        comparison_chart(_metrics(tmp_path, {"a/model": {"rra@5": 1.0}}), tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()
