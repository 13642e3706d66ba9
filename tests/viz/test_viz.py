"""Tests for qvggt.viz: PLY round trip, confidence filtering, point rendering and the summary figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from qvggt.viz import confident_points, read_ply, render_points, save_prediction_figure, write_ply


def _cloud(n: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pts = rng.normal(size=(n, 3)).astype(np.float32) + np.array([0, 0, 4], np.float32)
    cols = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    return pts, cols


# --- PLY -----------------------------------------------------------------------------------------------


def test_ply_round_trip_uint8(tmp_path: Path) -> None:
    pts, cols = _cloud()
    out = write_ply(tmp_path / "cloud.ply", pts, cols)
    assert [p.name for p in tmp_path.iterdir()] == ["cloud.ply"]  # no temp file left behind
    assert out.read_bytes().startswith(b"ply\nformat binary_little_endian 1.0")
    got_pts, got_cols = read_ply(out)
    assert got_pts.dtype == np.float32 and got_cols is not None and got_cols.dtype == np.uint8
    np.testing.assert_array_equal(got_pts, pts)
    np.testing.assert_array_equal(got_cols, cols)


def test_ply_float_colours_and_torch_input(tmp_path: Path) -> None:
    pts = torch.tensor([[0.0, 1.0, 2.0], [-1.5, 2.5, 1e3]], dtype=torch.float64)
    cols = torch.tensor([[0.0, 0.5, 1.0], [1.2, -0.1, 0.2]])  # out of range values are clipped
    write_ply(tmp_path / "a.ply", pts, cols)
    got_pts, got_cols = read_ply(tmp_path / "a.ply")
    np.testing.assert_array_equal(got_pts, pts.numpy().astype(np.float32))
    np.testing.assert_array_equal(got_cols, [[0, 128, 255], [255, 0, 51]])


def test_ply_overwrite_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.ply"  # parent folder is created
    write_ply(path, *_cloud(10))
    write_ply(path, np.zeros((0, 3)), np.zeros((0, 3), np.uint8))
    got_pts, got_cols = read_ply(path)
    assert got_pts.shape == (0, 3) and got_cols is not None and got_cols.shape == (0, 3)
    assert [p.name for p in path.parent.iterdir()] == ["c.ply"]


def test_ply_rejects_bad_input(tmp_path: Path) -> None:
    pts, cols = _cloud(4)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        write_ply(tmp_path / "a.ply", pts[:, :2], cols)
    with pytest.raises(ValueError, match="matching points"):
        write_ply(tmp_path / "a.ply", pts, cols[:3])
    pts[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_ply(tmp_path / "a.ply", pts, cols)
    assert list(tmp_path.iterdir()) == []  # a failed write leaves nothing behind


# --- confident_points ----------------------------------------------------------------------------------


def _point_map(s: int = 2, h: int = 4, w: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point map whose x coordinate encodes the flat pixel index, conf = index, colour = index / 255."""
    idx = np.arange(s * h * w, dtype=np.float32).reshape(s, h, w)
    pts = np.stack([idx, np.zeros_like(idx), np.ones_like(idx)], -1)
    images = np.repeat((idx / 255.0)[:, None], 3, axis=1)
    return pts, idx.copy(), images


def test_confident_points_keeps_upper_half() -> None:
    pts, conf, images = _point_map()  # 40 pixels, conf 0..39; 50th percentile = 19.5
    out_pts, out_cols = confident_points(pts, conf, images, percentile=50.0)
    np.testing.assert_array_equal(out_pts[:, 0], np.arange(20, 40))
    np.testing.assert_array_equal(out_cols[:, 0], np.arange(20, 40))
    assert out_cols.dtype == np.uint8 and out_pts.dtype == np.float32


def test_confident_points_drops_nans_and_respects_mask() -> None:
    pts, conf, images = _point_map()
    pts[0, 0, 0, 1] = np.nan  # index 0: non-finite point
    conf[1, 3, 4] = np.nan  # index 39: non-finite confidence
    pts[1, 0, 0] = np.inf  # index 20
    mask = np.ones(conf.shape, bool)
    mask[1, 1, :] = False  # indices 25..29
    out_pts, _ = confident_points(torch.from_numpy(pts), torch.from_numpy(conf), torch.from_numpy(images), 0.0, mask)
    expected = [i for i in range(40) if i not in {0, 20, 39, 25, 26, 27, 28, 29}]
    np.testing.assert_array_equal(out_pts[:, 0], expected)
    # Percentile over the 32 valid candidates only: the upper quarter is 8 points.
    out_pts, _ = confident_points(pts, conf, images, 75.0, mask)
    np.testing.assert_array_equal(out_pts[:, 0], expected[-8:])


def test_confident_points_subsamples_deterministically() -> None:
    pts, conf, images = _point_map(2, 10, 10)  # 200 pixels: colour index / 255 stays in [0, 1]
    a, ca = confident_points(pts, conf, images, 0.0, max_points=50, seed=1)
    b, _ = confident_points(pts, conf, images, 0.0, max_points=50, seed=1)
    c, _ = confident_points(pts, conf, images, 0.0, max_points=50, seed=2)
    assert a.shape == (50, 3) and ca.shape == (50, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.diff(a[:, 0]) > 0)  # original pixel order kept
    np.testing.assert_array_equal(ca[:, 0], a[:, 0])  # colours stay with their points


def test_confident_points_all_invalid_and_shape_errors() -> None:
    pts, conf, images = _point_map()
    out_pts, out_cols = confident_points(np.full_like(pts, np.nan), conf, images)
    assert out_pts.shape == (0, 3) and out_cols.shape == (0, 3)
    with pytest.raises(ValueError, match="conf must have shape"):
        confident_points(pts, conf[:, :2], images)
    with pytest.raises(ValueError, match="images must have shape"):
        confident_points(pts, conf, images[:, :, :2])


# --- rendering -----------------------------------------------------------------------------------------


def _render_to_array(points: np.ndarray, colors: np.ndarray, **kw: object) -> np.ndarray:
    fig = Figure(figsize=(2, 2), dpi=50)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    render_points(points, colors, ax, **kw)  # type: ignore[arg-type]
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def test_render_points_nearer_drawn_on_top() -> None:
    # Two identical grids of points, red at z=2 (near) and blue at z=6 (far), seen head-on and orthographically,
    # so each red marker lands exactly on a blue one: red must win wherever they overlap.
    g = np.stack(np.meshgrid(np.linspace(-1, 1, 40), np.linspace(-1, 1, 40)), -1).reshape(-1, 2)
    pts = np.r_[np.c_[g, np.full(len(g), 2.0)], np.c_[g, np.full(len(g), 6.0)]]
    cols = np.r_[np.tile([255, 0, 0], (len(g), 1)), np.tile([0, 0, 255], (len(g), 1))].astype(np.uint8)
    for order in (slice(None), slice(None, None, -1)):  # input order must not matter
        img = _render_to_array(pts[order], cols[order], view="front", perspective=False, point_size=30.0).astype(int)
        red = (img[..., 0] > 200) & (img[..., 2] < 80)
        blue = (img[..., 2] > 200) & (img[..., 0] < 80)
        assert red.sum() > 5 * max(blue.sum(), 1)


def test_render_points_focus_drops_the_far_background_and_zooms_in() -> None:
    # A dense red cluster (the objects) and a sparse blue ring 20x farther out (far ground): without focus
    # the ring sets the frame; with focus it is left out and the cluster fills the panel.
    rng = np.random.default_rng(0)
    near = rng.normal(0.0, 0.3, (3000, 3)) + [0.0, 0.0, 5.0]
    angle = rng.uniform(0, 2 * np.pi, 300)
    far = np.c_[6 * np.cos(angle), 6 * np.sin(angle), np.full(300, 5.0)]
    pts = np.r_[near, far]
    cols = np.r_[np.tile([255, 0, 0], (3000, 1)), np.tile([0, 0, 255], (300, 1))].astype(np.uint8)
    kw = {"view": "front", "perspective": False, "point_size": 20.0}
    whole = _render_to_array(pts, cols, **kw).astype(int)
    focused = _render_to_array(pts, cols, focus=1.5, **kw).astype(int)

    def red(img: np.ndarray) -> int:
        return int(((img[..., 0] > 200) & (img[..., 2] < 80)).sum())

    def blue(img: np.ndarray) -> int:
        return int(((img[..., 2] > 200) & (img[..., 0] < 80)).sum())

    assert blue(whole) > 0 and blue(focused) == 0
    assert red(focused) > 3 * red(whole)
    with pytest.raises(ValueError, match="focus must be > 0"):
        render_points(pts, cols, Figure().add_subplot(), focus=0.0)


def test_render_points_empty_and_bad_view() -> None:
    fig = Figure()
    ax = fig.add_subplot()
    render_points(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), ax)
    assert [t.get_text() for t in ax.texts] == ["no points"]
    with pytest.raises(ValueError, match="unknown view"):
        render_points(*_cloud(5), fig.add_subplot(), view="sideways")


# --- figure --------------------------------------------------------------------------------------------


def test_save_prediction_figure(tmp_path: Path) -> None:
    s, h, w = 10, 28, 42
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((s, 3, h, w), dtype=np.float32))
    depth = torch.from_numpy(1.0 + rng.random((s, h, w, 1), dtype=np.float32))  # VGGT's trailing 1 is accepted
    depth[2, :3, :3] = float("nan")
    pts, cols = _cloud(2000)
    path = save_prediction_figure(tmp_path / "fig.png", images, depth, pts, cols, pts[::2], None, title="t")
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert 400 <= im.width <= 4000 and 300 <= im.height <= 3000
        arr = np.asarray(im.convert("RGB"))
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 100  # not blank


def test_save_prediction_figure_single_frame_no_points(tmp_path: Path) -> None:
    path = save_prediction_figure(
        tmp_path / "one.png", np.ones((1, 3, 14, 14)), np.zeros((1, 14, 14)), np.zeros((0, 3)), np.zeros((0, 3))
    )
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100
    with pytest.raises(ValueError, match="depth must have shape"):
        save_prediction_figure(tmp_path / "bad.png", np.ones((2, 3, 14, 14)), np.zeros((1, 14, 14)), *_cloud(3))
