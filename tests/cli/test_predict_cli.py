"""`qvggt predict` end to end through the real CLI entry point (typer's runner, same process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from qvggt.cli import app
from qvggt.model import build_model, get_preset, save_checkpoint
from qvggt.viz import read_ply

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["predict", *args])


def test_synthetic_scene(tmp_path: Path) -> None:
    res = _run("synthetic:5", "--preset", "tiny", "--frames", "3", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "predictions.npz") as npz:
        arrays = dict(npz)
    assert arrays["pose_enc"].shape == (3, 9)
    assert arrays["depth"].shape == (3, 126, 126, 1)
    assert arrays["world_points"].shape == (3, 126, 126, 3)
    assert arrays["extrinsic"].shape == (3, 3, 4) and arrays["intrinsic"].shape == (3, 3, 3)
    # The intrinsics follow from the predicted field of view: principal point at the image centre.
    assert np.allclose(arrays["intrinsic"][:, 0, 2], 63.0) and np.allclose(arrays["intrinsic"][:, 1, 2], 63.0)
    points, colors = read_ply(tmp_path / "points.ply")
    assert 0 < len(points) <= 3 * 126 * 126 and colors is not None
    png = Image.open(tmp_path / "prediction.png")
    assert png.format == "PNG" and png.size[0] > 500
    assert not list(tmp_path.glob(".*.tmp"))
    # The default cloud is the depth branch: every PLY point is a depth point of the saved predictions.
    depth_points = arrays["depth_points"].reshape(-1, 3)
    assert depth_points.shape == (3 * 126 * 126, 3)
    assert np.isin(points[:, 0], depth_points[:, 0]).all()
    assert not np.isin(points[:, 0], arrays["world_points"].reshape(-1, 3)[:, 0]).all()


def test_pointmap_cloud_is_the_point_heads_output(tmp_path: Path) -> None:
    res = _run("synthetic:5", "--preset", "tiny", "--frames", "2", "--points", "pointmap", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "predictions.npz") as npz:
        world_points = npz["world_points"].reshape(-1, 3)
    points, _ = read_ply(tmp_path / "points.ply")
    assert len(points) > 0 and np.isin(points[:, 0], world_points[:, 0]).all()


def test_folder_of_images_and_our_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(200, 150), (200, 150), (200, 150)]):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model(get_preset("tiny")), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    res = _run(str(folder), "--checkpoint", str(ckpt), "--out", str(out), "--dtype", "bfloat16")
    assert res.exit_code == 0, res.output
    with np.load(out / "predictions.npz") as npz:
        # crop mode: width 126, height round(150 * 126 / 200 / 14) * 14 = 98
        assert npz["depth"].shape == (3, 98, 126, 1)


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("empty", [], "no images"),
        ("corrupt", [], "x.png"),
        ("missing", [], "not found"),
        ("synthetic", ["--size", "130"], "multiple of the patch size 14"),
        ("wrong_arch", [], "does not fit"),
        ("synthetic", ["--dtype", "float8"], "unknown dtype"),
        ("badseed", [], "synthetic:SEED"),
        ("synthetic", ["--preset", "huge"], "unknown preset"),
        ("synthetic", ["--points", "mesh"], "unknown points source"),
    ],
)
def test_bad_input_fails_clearly(tmp_path: Path, setup: str, args: list[str], message: str) -> None:
    source = str(tmp_path / "imgs")
    if setup in ("empty", "corrupt"):
        (tmp_path / "imgs").mkdir()
    if setup == "corrupt":
        (tmp_path / "imgs" / "x.png").write_bytes(b"not a png at all")
    if setup in ("synthetic", "wrong_arch"):
        source = "synthetic:1"
    if setup == "badseed":
        source = "synthetic:abc"
    if setup == "wrong_arch":
        torch.save(build_model(get_preset("tiny")).state_dict(), tmp_path / "model.pt")
        args = ["--checkpoint", str(tmp_path / "model.pt"), "--preset", "small"]
    out = tmp_path / "out"
    res = _run(source, "--out", str(out), *args)
    assert res.exit_code != 0
    assert message.lower() in res.output.lower(), res.output
    assert not (out / "predictions.npz").exists()


def test_params_yaml_model_is_the_default(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = build_model(get_preset("tiny")).eval()
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    params = tmp_path / "params.yaml"
    params.write_text(f"predict:\n  checkpoint: {ckpt}\n  conf_percentile: 10\n")
    res = _run("synthetic:7", "--frames", "2", "--out", str(tmp_path / "o"), "--params", str(params))
    assert res.exit_code == 0, res.output
    from qvggt.predict import load_inputs

    inputs = load_inputs("synthetic:7", (126, 126), num_frames=2)
    with torch.no_grad():
        expected = model(inputs.images)["depth"][0].numpy()
    with np.load(tmp_path / "o" / "predictions.npz") as npz:
        assert np.allclose(npz["depth"], expected, rtol=1e-5, atol=1e-6)


def test_a_failure_leaves_the_previous_outputs_as_a_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three files are moved into place together: a run that fails in the figure leaves the previous run's
    predictions, cloud and figure, not new predictions beside an old figure."""
    import qvggt.predict

    assert _run("synthetic:5", "--preset", "tiny", "--frames", "2", "--out", str(tmp_path)).exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"predictions.npz", "points.ply", "prediction.png"}

    def broken_figure(*args: object, **kwargs: object) -> None:
        raise RuntimeError("figure backend failed")

    monkeypatch.setattr(qvggt.predict, "save_prediction_figure", broken_figure)
    res = _run("synthetic:6", "--preset", "tiny", "--frames", "3", "--out", str(tmp_path))
    assert res.exit_code == 1 and "figure backend failed" in res.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no staging folder left either
