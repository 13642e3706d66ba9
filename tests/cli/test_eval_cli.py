"""`qvggt eval` end to end on held-out synthetic scenes with the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from qvggt.cli import app
from qvggt.config import load_config
from qvggt.eval.command import load_model_spec
from qvggt.model import build_model, get_preset, save_checkpoint
from qvggt.train.trainer import init_model

runner = CliRunner()


def test_eval_two_models_and_baseline_writes_metrics_and_report(tmp_path: Path) -> None:
    ckpt = save_checkpoint(build_model(get_preset("tiny")), tmp_path / "other" / "tiny.safetensors")
    out = tmp_path / "eval"
    args = ["eval", "--model", "preset:tiny", "--compare", str(ckpt), "--baseline", "--scenes", "2", "--frames", "2"]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| pose_auc@30 |" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"] == ["tiny-untrained", "other/tiny", "baseline:identity+plane"]
    assert {"pose_auc@30", "depth_abs_rel", "pm_chamfer"} <= set(metrics["aggregate"]["tiny-untrained"])
    assert "fid_rel_l2_depth" in metrics["aggregate"]["other/tiny"]
    assert len((out / "scenes.jsonl").read_text().splitlines()) == 2
    for name in ("report.md", "auc_curves.png", "depth_errors.png", "pointclouds.png", "histograms.png"):
        assert (out / "report" / name).is_file(), name
    # Rerunning is a no-op that reads the finished scenes back.
    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code == 0 and again.output.count("| pose_auc@30 |") == 1


def test_eval_rejects_bad_specs(tmp_path: Path) -> None:
    res = runner.invoke(app, ["eval", "--model", "preset:tiny", "--dataset", "imagenet", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "unknown dataset spec" in res.output
    res = runner.invoke(app, ["eval", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    assert res.exit_code == 1 and "not found" in res.output


def test_untrained_spec_is_the_training_runs_own_initialisation(tmp_path: Path) -> None:
    """``untrained:PARAMS`` builds what ``qvggt train`` starts from, architecture options included: the honest
    "untrained" column for a model with correspondence tokens, which ``preset:NAME`` would build without them."""
    params = tmp_path / "params.yaml"
    params.write_text(
        "train:\n  preset: tiny\n  image_size: 42\n  num_frames: 2\n  correspondence_tokens: true\n"
        "  token_init_std: 0.5\n  seed: 3\n"
    )
    name, model = load_model_spec(f"untrained:{params}")
    init = init_model(load_config(params).train).state_dict()
    got = model.state_dict()
    assert name == "tiny-untrained" and model.correspondence is not None
    assert got.keys() == init.keys() and all(torch.equal(got[k], init[k]) for k in init)
    assert not torch.equal(got["aggregator.camera_token"], load_model_spec("preset:tiny")[1].aggregator.camera_token)

    out = tmp_path / "eval"
    res = runner.invoke(
        app, ["eval", "--model", f"untrained:{params}", "--scenes", "1", "--frames", "2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["models"] == ["tiny-untrained"]
    res = runner.invoke(app, ["eval", "--model", f"untrained:{tmp_path / 'nope.yaml'}", "--out", str(out)])
    assert res.exit_code == 1 and "config file not found" in res.output


def test_eval_on_co3d_defaults_to_vggts_categories(tmp_path: Path) -> None:
    """VGGT's protocol scores its 41 categories: a Co3Dv2 category outside them is skipped unless asked for."""
    from tests.eval.co3d_tiny import multi_layout, write_tiny_co3d  # the tests' tiny Co3D writer

    # 50 frames per sequence: the CLI keeps VGGT's minimum sequence length.
    root = write_tiny_co3d(tmp_path / "co3d", multi_layout(("apple", "bench", "frisbee"), 1, 0, frames=50))
    base = ["eval", "--model", "preset:tiny", "--dataset", f"co3d:{root}", "--frames", "2", "--scenes", "1"]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "vggt")])
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "vggt" / "run.json").read_text())
    assert run["settings"]["categories"] == ["apple", "bench"] and run["samples"][0].startswith("co3d/apple/")
    res = runner.invoke(app, [*base, "--categories", "frisbee", "--out", str(tmp_path / "frisbee")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "frisbee" / "run.json").read_text())["samples"][0].startswith("co3d/frisbee/")
    res = runner.invoke(app, ["eval", "--model", "preset:tiny", "--categories", "all", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "co3d:ROOT datasets only" in res.output
