"""`qvggt calibrate`: a byte-identical manifest for the same inputs and seed, settings from params.yaml, and bad
settings refused before any work (nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qvggt.calib.manifest import CalibrationManifest
from qvggt.cli import app
from qvggt.model import load_vggt, save_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(load_vggt(preset="tiny"), tmp_path_factory.mktemp("calib") / "tiny.safetensors")


def _params(tmp: Path, checkpoint: Path, **calibrate: object) -> Path:
    section = {"checkpoint": str(checkpoint), "pool_scenes": 6, "frames": 2, "n_clusters": 2, "n_per_cluster": 1,
               "n_init": 2, **calibrate}  # fmt: skip
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump({"calibrate": section}))
    return path


def test_calibrate_writes_a_reproducible_manifest(tiny: Path, tmp_path: Path) -> None:
    params = _params(tmp_path, tiny)
    runs = [CliRunner().invoke(app, ["calibrate", "--params", str(params), "--out", str(tmp_path / d)]) for d in "ab"]
    for r in runs:
        assert r.exit_code == 0, r.output
    a, b = (tmp_path / d / "manifest.json" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    manifest = CalibrationManifest.read(a)
    # 2 clusters x 1: topped up to the size asked for whenever the pool has the survivors (it does: 6 scenes).
    assert manifest.mode == "nfds" and len(manifest.pool_ids) == 6 and len(manifest.sample_ids) == 2
    assert "2 of 2 selected" in runs[0].output
    assert str(tmp_path) not in a.read_text()  # no absolute paths: the file is machine-independent
    summary = json.loads((tmp_path / "a" / "calibrate.json").read_text())
    assert summary["manifest_sha256"] == manifest.sha256() and summary["pool_size"] == 6
    # The seed is part of the selection: another seed is recorded (and may pick other samples).
    r = CliRunner().invoke(app, ["calibrate", "--params", str(params), "--seed", "1", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert CalibrationManifest.read(tmp_path / "c" / "manifest.json").seed == 1


@pytest.mark.parametrize(
    "args,calibrate,message",
    [
        (["--n-clusters", "9"], {}, "smaller than n_clusters=9"),
        (["--mode", "best"], {}, "unknown calibration mode 'best'"),
        ([], {"pool_scenes": 1, "n_clusters": 3}, "pool_scenes=1 is smaller than n_clusters=3"),
        (["--model", "missing.safetensors"], {}, "checkpoint not found"),
    ],
)
def test_calibrate_refuses_bad_settings(tiny: Path, tmp_path: Path, args: list, calibrate: dict, message: str) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["calibrate", "--params", str(_params(tmp_path, tiny, **calibrate)), "--out", str(out),
                                 *args])  # fmt: skip
    assert r.exit_code == 1 and message in r.output, r.output
    assert not out.exists()


def test_steps_give_the_same_manifest_as_build_manifest(tiny: Path, tmp_path: Path) -> None:
    """The four cached steps (pool -> features -> outliers -> selection) are exactly NFDS in one call."""
    from qvggt.calib.command import run_calibrate
    from qvggt.calib.manifest import build_manifest
    from qvggt.eval.datasets import SyntheticEvalDataset
    from qvggt.io import sha256_file

    result = run_calibrate(tiny, tmp_path, "nfds", 3, pool_scenes=8, frames=2, n_clusters=3, n_per_cluster=1, n_init=2)
    model = load_vggt(tiny).eval()
    h, w = model.cfg.default_image_hw
    pool = list(SyntheticEvalDataset.from_config(8, "calib", num_frames=2, height=h, width=w))
    config = {"dataset": "synthetic:calib", "pool_scenes": 8, "frames": 2, "image_hw": [h, w],
              "model_sha256": sha256_file(tiny)}  # fmt: skip
    with torch.no_grad():
        direct = build_manifest(model, pool, "nfds", 3, 1, seed=3, n_init=2, config=config)
    assert result.manifest_path.read_text() == direct.to_json()
    assert {p.name for p in tmp_path.iterdir()} == {
        "pool.json", "features.npz", "outliers.json", "manifest.json", "calibrate.json"
    }  # fmt: skip


def test_a_pool_that_no_longer_renders_the_same_is_refused(tiny: Path, tmp_path: Path) -> None:
    from qvggt.calib.command import load_pool, write_pool

    pool = write_pool(tmp_path, 2, 2, (14 * 3, 14 * 3))
    doc = json.loads(pool.read_text())
    doc["samples"][1]["sha256"] = "0" * 64
    pool.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="no longer renders the same images"):
        load_pool(pool)


def test_manifest_batches_render_the_selected_samples(tiny: Path, tmp_path: Path) -> None:
    from qvggt.calib.command import manifest_batches, run_calibrate

    result = run_calibrate(tiny, tmp_path, "nfds", 0, pool_scenes=6, frames=2, n_clusters=2, n_per_cluster=1, n_init=2)
    batches, ids = manifest_batches(result.manifest_path)
    manifest = CalibrationManifest.read(result.manifest_path)
    assert ids == manifest.sample_ids and len(batches) == len(ids)
    h, w = load_vggt(tiny).cfg.default_image_hw
    assert all(tuple(b.shape) == (1, 2, 3, h, w) for b in batches)
