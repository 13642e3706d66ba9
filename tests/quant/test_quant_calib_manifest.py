"""run_quantize calibrates on exactly the samples a ``qvggt calibrate`` manifest names, and records them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qvggt.calib.command import run_calibrate
from qvggt.model import load_vggt, save_checkpoint
from qvggt.quant.command import run_quantize
from qvggt.quant.export import read_manifest


@pytest.fixture(scope="module")
def tiny_and_manifest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("calib")
    torch.manual_seed(0)
    base = save_checkpoint(load_vggt(preset="tiny"), root / "base.safetensors")
    result = run_calibrate(base, root / "cal", "random", 3, pool_scenes=4, frames=2, n_clusters=2, n_per_cluster=1)
    return base, result.manifest_path, result.manifest_sha256


def test_manifest_samples_are_the_calibration_set(tiny_and_manifest, tmp_path: Path) -> None:
    from qvggt.calib.manifest import CalibrationManifest

    base, manifest_path, sha = tiny_and_manifest
    chosen = CalibrationManifest.read(manifest_path).sample_ids
    result = run_quantize("smoothquant", 8, 8, tmp_path / "q", base, calib_manifest=manifest_path)
    calib = read_manifest(result.path)["calibration"]
    assert calib == {"sample_ids": chosen, "manifest_sha256": sha}
    assert result.num_calibration_samples == len(chosen)
    # Without a manifest the first calib_scenes scenes of the split are used: another set, no manifest hash.
    default = read_manifest(run_quantize("smoothquant", 8, 8, tmp_path / "d", base, calib_scenes=2).path)
    assert default["calibration"]["manifest_sha256"] is None


def test_data_free_method_ignores_the_manifest(tiny_and_manifest, tmp_path: Path) -> None:
    base, manifest_path, _ = tiny_and_manifest
    result = run_quantize("rtn", 8, 8, tmp_path / "q", base, calib_manifest=manifest_path)
    assert read_manifest(result.path)["calibration"] == {"sample_ids": [], "manifest_sha256": None}


def test_bad_manifests_are_refused(tiny_and_manifest, tmp_path: Path) -> None:
    base, _, _ = tiny_and_manifest
    with pytest.raises(FileNotFoundError, match="qvggt calibrate"):
        run_quantize("smoothquant", 8, 8, tmp_path / "q", base, calib_manifest=tmp_path / "missing.json")
    bogus = tmp_path / "bogus.json"
    bogus.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a calibration manifest"):
        run_quantize("smoothquant", 8, 8, tmp_path / "q", base, calib_manifest=bogus)


def test_a_manifest_selected_with_another_model_is_refused_unless_allowed(tiny_and_manifest, tmp_path: Path) -> None:
    import json

    from qvggt.io import sha256_file

    base, manifest_path, sha = tiny_and_manifest
    torch.manual_seed(1)
    other = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "other.safetensors")  # same shape, other weights
    recorded = json.loads(Path(manifest_path).read_text())["config"]["model_sha256"]
    assert recorded == sha256_file(base) != sha256_file(other)
    with pytest.raises(ValueError, match=rf"selected with model sha256 {recorded}.*{sha256_file(other)}.*calibrate"):
        run_quantize("smoothquant", 8, 8, tmp_path / "q", other, calib_manifest=manifest_path)
    result = run_quantize(
        "smoothquant", 8, 8, tmp_path / "q", other, calib_manifest=manifest_path, allow_other_model=True
    )
    assert read_manifest(result.path)["calibration"]["manifest_sha256"] == sha
    # A manifest without the model's hash is still checked on its image size (vggt-1b runs at 518, not 126).
    doc = json.loads(Path(manifest_path).read_text())
    del doc["config"]["model_sha256"]
    doc["config"]["image_hw"] = [518, 392]
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"renders its samples at 518x392.*runs at 126x126"):
        run_quantize("smoothquant", 8, 8, tmp_path / "q", base, calib_manifest=odd)


def test_cli_names_the_override_and_takes_it(tiny_and_manifest, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qvggt.cli import app

    _, manifest_path, _ = tiny_and_manifest
    torch.manual_seed(2)
    other = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "other.safetensors")
    args = ["quantize", "--method", "smoothquant", "--model", str(other), "--calib-manifest", str(manifest_path)]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "--allow-other-model" in refused.output and "calibrate --model" in refused.output
    allowed = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--allow-other-model"])
    assert allowed.exit_code == 0, allowed.output
