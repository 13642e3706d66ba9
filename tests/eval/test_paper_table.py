"""The paper-table reproduction runs end to end on a tiny Co3D directory with the tiny preset (so it cannot rot)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from co3d_tiny import write_tiny_co3d
from typer.testing import CliRunner

from qvggt.cli import app
from qvggt.eval.paper_table import reproduce_table
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
    cells = json.loads((tmp_path / "table.json").read_text())
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
    assert "paper 88.1 / 80.7 / 60.3 / 46.7" in md  # RTN W8A8 from the paper, beside ours at 10 frames
    # A rerun reuses every quantized checkpoint (same base weights and config).
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "models").rglob("model.safetensors")}
    assert len(mtimes) == 4
    assert CliRunner().invoke(app, args).exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_bad_requests_fail_before_any_work(setup: tuple[Path, Path], tmp_path: Path) -> None:
    co3d, ckpt = setup
    with pytest.raises(ValueError, match="unknown bit setting"):
        reproduce_table(ckpt, co3d, tmp_path, methods=["rtn"], bits=["w3a3"])
    with pytest.raises(ValueError, match="unknown method"):
        reproduce_table(ckpt, co3d, tmp_path, methods=["magic"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        reproduce_table(tmp_path / "missing.safetensors", co3d, tmp_path, methods=["rtn"])
    assert not any(tmp_path.iterdir())
