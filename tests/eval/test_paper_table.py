"""The paper-table reproduction runs end to end on a tiny Co3D directory with the tiny preset (so it cannot rot)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from co3d_tiny import multi_layout, write_tiny_co3d
from typer.testing import CliRunner

from qvggt.calib.nfds import deep_layer_features, iqr_outliers
from qvggt.cli import app
from qvggt.eval.datasets import Co3DDataset
from qvggt.eval.paper_table import calibration_ids, reproduce_table, round_robin_ids
from qvggt.model import load_vggt, save_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("paper")
    torch.manual_seed(0)
    return write_tiny_co3d(root / "co3d"), save_checkpoint(load_vggt(preset="tiny"), root / "fp.safetensors")


def test_one_command_reproduces_the_table_and_resumes(setup: tuple[Path, Path], tmp_path: Path) -> None:
    co3d, ckpt = setup
    args = ["reproduce-table", "--checkpoint", str(ckpt), "--co3d", str(co3d), "--out", str(tmp_path),
            "--methods", "rtn,smoothquant", "--frames", "10,4", "--calib-sequences", "1", "--calib-frames", "4",
            "--min-sequence-length", "10"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    table = json.loads((tmp_path / "table.json").read_text())
    # VGGT's 41 categories by default: the fixture's "frisbee" is not scored, and the list used is recorded.
    assert table["categories"] == ["apple", "bench"] and len(table["missing_vggt_categories"]) == 39
    run = json.loads((tmp_path / "eval_10f" / "run.json").read_text())
    assert {s.split("/")[1] for s in run["samples"]} == {"apple", "bench"}
    cells = table["cells"]
    assert len(cells) == 2 * (1 + 2 * 2)  # per frame count: FP + 2 methods x 2 bit settings
    fp = [c for c in cells if c["method"] == "fp"]
    assert [c["frames"] for c in fp] == [10, 4] and all(c["retention"] is None for c in fp)
    fp_auc30 = {c["frames"]: c["auc"][0] for c in fp}
    for c in cells:
        assert len(c["auc"]) == 4 and all(0 <= a <= 100 for a in c["auc"])
        if c["method"] != "fp":  # retention is defined exactly when FP has a non-zero AUC@30 (random tiny weights)
            assert math.isfinite(c["retention"]) == (fp_auc30[c["frames"]] > 0)
    # Calibration came from the train split; the test split is what got evaluated.
    manifest = json.loads((tmp_path / "models" / "smoothquant-w8a8" / "model.json").read_text())
    assert [i.split("/")[2] for i in manifest["calibration"]["sample_ids"]] == ["seqD"]
    md = (tmp_path / "table.md").read_text()
    assert "## 10 frames" in md and "## 4 frames" in md and "| W8A8 | W4A4 |" in md
    assert "Categories (2): apple, bench" in md
    assert "paper 88.1 / 80.7 / 60.3 / 46.7" in md  # RTN W8A8 from the paper, beside ours at 10 frames
    # A rerun reuses every quantized checkpoint (same base weights and config).
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "models").rglob("model.safetensors")}
    assert len(mtimes) == 4
    assert CliRunner().invoke(app, args).exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # A checkpoint calibrated by another recipe (e.g. the old first-N-sequences draw) is redone, the rest reused.
    stale = tmp_path / "models" / "smoothquant-w4a4"
    recipe = json.loads((stale / "calibration_recipe.json").read_text())
    assert recipe["selection"] == "round-robin" and recipe["sequences"] == 1
    (stale / "calibration_recipe.json").write_text(json.dumps({**recipe, "selection": "first-n"}))
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output  # same calibration and seed: identical weights, so the evaluations resume
    redone = {p for p in mtimes if p.stat().st_mtime_ns != mtimes[p]}
    assert redone == {stale / "model.safetensors"}


def test_calibration_draws_spread_over_categories_and_nfds_drops_outliers(tmp_path: Path) -> None:
    layout = multi_layout(("apple", "bench", "cup", "frisbee"), n_test=1, n_train=3)
    root = write_tiny_co3d(tmp_path / "co3d", layout, black=(("bench", "r1"),))  # all-black images: an outlier
    ds = Co3DDataset(root, split="train", min_sequence_length=10, num_frames=4, target_size=126)
    assert ds.categories == ["apple", "bench", "cup"]
    cats = lambda ids: sorted(i.split("/")[1] for i in ids)
    picked = round_robin_ids(ds, 3)
    assert cats(picked) == ["apple", "bench", "cup"] and picked == round_robin_ids(ds, 3)
    assert cats(round_robin_ids(ds, 5)).count("apple") <= 2 and len(round_robin_ids(ds, 5)) == 5

    torch.manual_seed(0)
    model = load_vggt(preset="tiny").eval()
    ids = ds.sample_ids()
    deep = np.stack([deep_layer_features(model, ds.load(i).images)["deep"] for i in ids])
    flagged = iqr_outliers(deep, [i.split("/")[1] for i in ids])
    assert flagged[ids.index(next(i for i in ids if "/bench/r1/" in i))]  # the black sequence is flagged
    survivors = {i for i, f in zip(ids, flagged, strict=True) if not f}
    # The whole pool as candidates and a budget above the survivors: NFDS returns exactly the survivors.
    assert set(calibration_ids(ds, 8, "nfds", pool=9, model=model)) == survivors
    small = calibration_ids(ds, 3, "nfds", pool=9, model=model)
    assert len(small) == 3 and set(small) <= survivors and small == calibration_ids(ds, 3, "nfds", pool=9, model=model)


def test_bad_requests_fail_before_any_work(setup: tuple[Path, Path], tmp_path: Path) -> None:
    co3d, ckpt = setup
    with pytest.raises(ValueError, match="unknown bit setting"):
        reproduce_table(ckpt, co3d, tmp_path, methods=["rtn"], bits=["w3a3"])
    with pytest.raises(ValueError, match="unknown method"):
        reproduce_table(ckpt, co3d, tmp_path, methods=["magic"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        reproduce_table(tmp_path / "missing.safetensors", co3d, tmp_path, methods=["rtn"])
    assert not any(tmp_path.iterdir())
