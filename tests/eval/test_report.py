"""The evaluation report: figures from a hand-made result and predictions file, and from a real evaluate()."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvggt.eval.report import depth_error_maps, write_report
from qvggt.eval.runner import EvalResult, format_table

MODELS = ["fp32", "baseline:identity+plane"]
FIGURES = ["auc_curves.png", "depth_errors.png", "pointclouds.png", "histograms.png"]


def _check_png(path: Path) -> None:
    assert path.stat().st_size < 2_000_000
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("RGB")).astype(np.uint32)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    codes = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    assert len(np.unique(codes)) > 10, f"{path.name} is (nearly) a single colour"


def _records() -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(5):
        models = {}
        for j, m in enumerate(MODELS):
            metrics = {
                "depth_abs_rel": float(0.05 + 0.1 * j + 0.02 * rng.random()),
                "rot_err_median": float(2 + 10 * j + rng.random()),
                "pm_chamfer": float(0.1 * (j + 1) + 0.05 * rng.random()),
                "pose_auc@30": float(80 - 30 * j),
            }
            if i == 3 and j == 1:
                metrics["rot_err_median"] = math.inf  # a failed scene: dropped from the histogram
            models[m] = {"metrics": metrics, "pose_err_hist": [1] * 30, "pose_pairs": 40}
        records.append({"index": i, "sample_id": f"s{i}", "category": ["spheres", "boxes"][i % 2], "models": models})
    return records


def _result(with_curves: bool = True) -> EvalResult:
    aggregate = {}
    for j, m in enumerate(MODELS):
        agg = {"pose_auc@30": 80.0 - 30 * j, "depth_abs_rel": 0.05 + 0.1 * j, "rot_err_median": 2.0 + 10 * j}
        if with_curves:
            agg["pose_curve"] = list(np.minimum(100.0, np.cumsum(np.full(30, 6.0 - 2 * j))))
        aggregate[m] = agg
    comparison = {MODELS[1]: {"depth_abs_rel": {"mean_diff": 0.1, "low": 0.08, "high": 0.12}}}
    return EvalResult(list(MODELS), aggregate, comparison, _records())


def _write_predictions(out: Path, s: int = 3, h: int = 28, w: int = 28) -> None:
    rng = np.random.default_rng(1)
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    depth = np.stack([2.0 + 0.05 * u + 0.1 * f + 0.3 * np.sin(v / 4) for f in range(s)]).astype(np.float32)
    valid = np.ones((s, h, w), bool)
    valid[:, :4] = False  # sky: grey in the error maps
    rays = np.stack([(u - w / 2) / 30, (v - h / 2) / 30, np.ones_like(u)], -1)
    gt_points = depth[..., None] * rays[None]
    images = np.stack([np.stack([u / w, v / h, np.full_like(u, f / s)]) for f in range(s)]).astype(np.float32)
    arrays = {"images": images, "gt/depth": depth, "gt/valid_mask": valid, "gt/world_points": gt_points}
    for j, m in enumerate(MODELS):
        pred = 0.5 * depth * (1 + (0.1 + 0.2 * j) * rng.standard_normal(depth.shape)).astype(np.float32)
        arrays[f"{m}/depth"] = pred
        arrays[f"{m}/world_points"] = (pred[..., None] * rays[None]).astype(np.float32)
        arrays[f"{m}/world_points_conf"] = rng.random((s, h, w)).astype(np.float32) + 1
    (out / "predictions").mkdir(parents=True)
    np.savez_compressed(out / "predictions" / "0.npz", **arrays)


def test_report_writes_every_figure(tmp_path: Path) -> None:
    _write_predictions(tmp_path)
    result = _result()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no figure may fail silently
        paths = write_report(tmp_path, result)

    report = tmp_path / "report"
    assert [p.name for p in paths] == [*FIGURES, "report.md"]
    for name in FIGURES:
        _check_png(report / name)
    md = (report / "report.md").read_text()
    assert format_table(result).splitlines()[0] in md
    assert "| metric | fp32 | baseline:identity+plane |" in md
    assert "Scenes: 5 in 2 categories" in md
    for name in FIGURES:
        assert f"]({name})" in md


def test_report_without_predictions_or_curves(tmp_path: Path) -> None:
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "auc_curves.png").write_bytes(b"stale")  # from an earlier run: must not be linked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_report(tmp_path, _result(with_curves=False))
    assert [p.name for p in paths] == ["histograms.png", "report.md"]
    _check_png(tmp_path / "report" / "histograms.png")
    assert not (tmp_path / "report" / "auc_curves.png").exists()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "](histograms.png)" in md and "auc_curves.png" not in md and "depth_errors.png" not in md


def test_report_with_no_metrics_and_partial_predictions(tmp_path: Path) -> None:
    """No records, no GT depth, one model without world points: the report still comes out."""
    rng = np.random.default_rng(0)
    (tmp_path / "predictions").mkdir()
    np.savez_compressed(
        tmp_path / "predictions" / "0.npz",
        images=rng.random((2, 3, 28, 28)).astype(np.float32),
        **{"fp32/world_points": rng.standard_normal((2, 28, 28, 3)).astype(np.float32)},
    )
    result = EvalResult(list(MODELS), {m: {} for m in MODELS}, {}, [])
    paths = write_report(tmp_path, result)
    assert [p.name for p in paths] == ["pointclouds.png", "report.md"]
    _check_png(paths[0])
    assert "Scenes: 0 in 0 categories" in (tmp_path / "report" / "report.md").read_text()


def test_depth_error_maps_match_depth_metrics() -> None:
    from qvggt.eval.metrics.depth import depth_metrics

    rng = np.random.default_rng(2)
    gt = rng.uniform(1, 5, (3, 14, 14)).astype(np.float32)
    pred = (gt * rng.uniform(0.7, 1.3, gt.shape) * np.array([1.0, 3.0, 0.2])[:, None, None]).astype(np.float32)
    valid = rng.random(gt.shape) > 0.2
    pred[0, 0, 0] = np.nan
    err = depth_error_maps(pred, gt, valid)
    assert np.isnan(err[~valid]).all() and np.isnan(err[0, 0, 0])
    ref = depth_metrics(pred, gt, valid, align="frame")["depth_abs_rel"]
    assert np.nanmean(err) == pytest.approx(ref, rel=1e-5)


def test_report_of_real_evaluation(tmp_path: Path) -> None:
    from qvggt.eval.datasets import SyntheticEvalDataset
    from qvggt.eval.runner import ModelPredictor, TrivialBaseline, evaluate
    from qvggt.model import build_model, get_preset

    model = build_model(get_preset("tiny")).eval()
    dataset = SyntheticEvalDataset(seeds=[200000, 200001], num_frames=2, height=42, width=42)
    result = evaluate(dataset, [ModelPredictor("tiny", model), TrivialBaseline()], tmp_path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_report(tmp_path, result)
    assert [p.name for p in paths] == [*FIGURES, "report.md"]
    for p in paths[:-1]:
        _check_png(p)
    md = paths[-1].read_text()
    assert "| metric | tiny | baseline:identity+plane |" in md and "Scenes: 2 in 2 categories" in md
