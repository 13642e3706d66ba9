"""Depth metrics: median alignment, known per-pixel errors, pixel selection and degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvggt.eval.metrics import depth_metrics, select_depth_pixels


def _gt(shape: tuple[int, ...] = (3, 4, 5), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.5, 5.0, size=shape)


def test_scaled_prediction_is_perfect_after_alignment_only() -> None:
    gt = _gt()
    for align in ("frame", "scene"):
        m = depth_metrics(2 * gt, gt, align=align)
        assert m["depth_abs_rel"] == pytest.approx(0.0, abs=1e-12)
        assert m["depth_rmse"] == pytest.approx(0.0, abs=1e-12)
        assert m["depth_delta1"] == 100.0 and m["depth_nonfinite_pct"] == 0.0
    m = depth_metrics(2 * gt, gt, align="none")
    assert m["depth_abs_rel"] == pytest.approx(1.0)
    assert m["depth_rmse"] == pytest.approx(np.sqrt(np.mean(gt**2)))
    assert m["depth_delta1"] == 0.0  # ratio 2 >= 1.25 everywhere


def test_known_per_pixel_errors() -> None:
    gt = np.array([[[1.0, 2.0, 4.0, 8.0]]])
    m = depth_metrics(np.array([[[1.1, 2.0, 4.0, 8.0]]]), gt, align="none")
    assert m["depth_abs_rel"] == pytest.approx(0.1 / 4)
    assert m["depth_rmse"] == pytest.approx(np.sqrt(0.01 / 4))
    assert m["depth_delta1"] == 100.0
    m = depth_metrics(np.array([[[1.0, 2.0, 4.0, 12.0]]]), gt, align="none")
    assert m["depth_abs_rel"] == pytest.approx(0.5 / 4)
    assert m["depth_rmse"] == pytest.approx(2.0)
    assert m["depth_delta1"] == 75.0  # 12 / 8 = 1.5 fails


def test_median_alignment_values() -> None:
    # median(gt) = 2, median(pred) = 1 -> scale 2 -> pred [1, 2, 4]
    m = depth_metrics(np.array([[[0.5, 1.0, 2.0]]]), np.array([[[1.0, 2.0, 3.0]]]), align="frame")
    assert m["depth_abs_rel"] == pytest.approx(1 / 9)
    assert m["depth_rmse"] == pytest.approx(np.sqrt(1 / 3))
    # frame 0 predicted at 2x, frame 1 at 4x: per frame both fix, one scene scale (median 1 / 3) cannot
    gt = np.ones((2, 1, 4))
    pred = np.concatenate([2 * gt[:1], 4 * gt[1:]])
    assert depth_metrics(pred, gt, align="frame")["depth_abs_rel"] == pytest.approx(0.0)
    m = depth_metrics(pred, gt, align="scene")
    assert m["depth_abs_rel"] == pytest.approx(1 / 3)
    assert m["depth_delta1"] == 0.0
    with pytest.raises(ValueError, match="align must be"):
        depth_metrics(pred, gt, align="median")


def test_valid_pixels_exclude_bad_gt_and_masked() -> None:
    gt = np.array([[[1.0, 0.0, np.nan, -1.0, 2.0, 3.0]]])
    pred = np.array([[[1.0, 9.0, 9.0, 9.0, 2.0, 30.0]]])
    valid = np.array([[[True, True, True, True, True, False]]])
    sel = select_depth_pixels(gt, valid)
    np.testing.assert_array_equal(sel, [[[True, False, False, False, True, False]]])
    m = depth_metrics(pred, gt, valid, align="none")
    assert m["depth_abs_rel"] == 0.0 and m["depth_delta1"] == 100.0


def test_top_percent_selects_exactly_the_most_confident() -> None:
    gt = np.ones((2, 2, 2))
    conf = np.array([[[0.9, 0.1], [0.5, 0.7]], [[0.3, 0.8], [0.2, 0.6]]])
    sel = select_depth_pixels(gt, None, conf, top_percent=50)
    expected = conf >= 0.6  # 8 valid pixels, the 4 most confident: 0.9, 0.8, 0.7, 0.6
    np.testing.assert_array_equal(sel, expected)
    # low-confidence pixels are wrong, the kept ones right -> perfect scores
    pred = np.where(expected, 1.0, 7.0)
    m = depth_metrics(pred, gt, conf=conf, top_percent=50, align="none")
    assert m["depth_abs_rel"] == 0.0 and m["depth_delta1"] == 100.0
    # ceil(8 * 30 / 100) = 3 pixels; among masked-out pixels nothing is picked; ties go to the earliest pixel
    valid = np.ones_like(gt, dtype=bool)
    valid[0, 0, 0] = False
    sel = select_depth_pixels(gt, valid, np.ones_like(gt), top_percent=30)
    assert sel.sum() == 3 and not sel[0, 0, 0]
    np.testing.assert_array_equal(np.flatnonzero(sel), [1, 2, 3])
    with pytest.raises(ValueError, match="needs a conf"):
        depth_metrics(pred, gt, top_percent=50)
    with pytest.raises(ValueError, match="top_percent must be"):
        depth_metrics(pred, gt, conf=conf, top_percent=0)


def test_all_invalid_raises() -> None:
    gt = _gt()
    with pytest.raises(ValueError, match="no valid depth pixels"):
        depth_metrics(gt, gt, valid=np.zeros_like(gt, dtype=bool))
    with pytest.raises(ValueError, match="no valid depth pixels"):
        depth_metrics(gt, np.zeros_like(gt))
    with pytest.raises(ValueError, match="differ in shape"):
        depth_metrics(gt[:2], gt)


def test_nan_predictions_count_as_failures() -> None:
    gt = np.array([[[1.0, 2.0, 4.0, 8.0]]])
    pred = gt.copy()
    pred[0, 0, 1] = np.nan
    for align in ("none", "frame", "scene"):
        m = depth_metrics(pred, gt, align=align)
        assert m["depth_abs_rel"] == pytest.approx(0.0, abs=1e-12)  # over the finite predictions
        assert m["depth_delta1"] == 75.0  # the NaN pixel is a miss
        assert m["depth_nonfinite_pct"] == 25.0
    m = depth_metrics(np.full_like(gt, np.nan), gt)
    assert m == {"depth_abs_rel": np.inf, "depth_rmse": np.inf, "depth_delta1": 0.0, "depth_nonfinite_pct": 100.0}
    # a negative median prediction gives no usable scale: the frame fails
    m = depth_metrics(-gt, gt, align="frame")
    assert m["depth_delta1"] == 0.0 and m["depth_abs_rel"] == np.inf
    assert depth_metrics(-gt, gt, align="none")["depth_delta1"] == 0.0  # negative depth never within 1.25


def test_trailing_channel_and_torch_inputs() -> None:
    gt = _gt()
    m = depth_metrics(torch.from_numpy(2 * gt[..., None]).float(), gt[..., None], conf=torch.ones(3, 4, 5, 1))
    assert m["depth_abs_rel"] == pytest.approx(0.0, abs=1e-6)
    m = depth_metrics(torch.from_numpy(gt).to(torch.bfloat16), gt, align="none")
    assert m["depth_abs_rel"] < 1e-2
