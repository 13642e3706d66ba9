"""`qvggt train` refuses what would silently go wrong: no --out (the old default overwrote the embedded model) and
a --steps override that the other train settings no longer fit."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from qvggt.cli import app

REPO = Path(__file__).resolve().parents[2]


def test_out_is_required() -> None:
    r = CliRunner().invoke(app, ["train", "--steps", "10"])
    assert r.exit_code == 2 and "--out" in r.output
    assert (REPO / "models" / "small" / "model.safetensors").is_file()  # untouched


def test_steps_override_is_validated(tmp_path: Path) -> None:
    # params.yaml's train: 100 warm-up steps, matcher to 2,000 and camera-only to 7,000 steps.
    args = ["train", "--steps", "50", "--out", str(tmp_path / "m"), "--work-dir", str(tmp_path / "w")]
    r = CliRunner().invoke(app, [*args, "--params", str(REPO / "params.yaml"), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 1 and "warmup_steps" in r.output, r.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()  # refused before any work
