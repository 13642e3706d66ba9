"""Heavy-tail summary across models: a planted massive channel on the special tokens shows up where it should."""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from qvggt.calib.heavy_tails import heavy_tail_rows, heavy_tail_table, measure_heavy_tails
from qvggt.calib.stats import collect_stats
from qvggt.cli import app
from qvggt.model import load_vggt, save_checkpoint


def _batches(n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(1, 2, 3, 56, 84, generator=gen) for _ in range(n)]


def _row(rows: list[dict], model: str, linear: str, group: str) -> dict:
    return next(r for r in rows if (r["model"], r["linear"], r["group"]) == (model, linear, group))


def test_planted_special_token_outlier_is_found_in_the_special_group(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = load_vggt(preset="tiny")
    stressed = load_vggt(preset="tiny")
    stressed.load_state_dict(base.state_dict())
    with torch.no_grad():  # one residual channel of the camera token 100x larger: a "massive activation"
        stressed.aggregator.camera_token[..., 7] = 100.0
    rows = measure_heavy_tails({"base": base, "stressed": stressed}, _batches(), tmp_path, plots=False)
    s_special, s_patch = _row(rows, "stressed", "qkv", "special"), _row(rows, "stressed", "qkv", "patch")
    b_special = _row(rows, "base", "qkv", "special")
    assert s_special["median_outlier_ratio"] > 3 * max(
        s_patch["median_outlier_ratio"], b_special["median_outlier_ratio"]
    )
    # Patch tokens never see the camera token in frame blocks' inputs: their statistics barely move.
    b_patch = _row(rows, "base", "qkv", "patch")
    assert (
        abs(s_patch["median_outlier_ratio"] - b_patch["median_outlier_ratio"]) < 0.5 * b_patch["median_outlier_ratio"]
    )
    table = (tmp_path / "heavy_tails.md").read_text()
    assert table == heavy_tail_table(rows) and "| stressed | qkv | special |" in table
    assert (tmp_path / "stressed").is_dir()  # the full statistics are saved per model


def test_rows_cover_every_linear_and_group() -> None:
    torch.manual_seed(0)
    report = collect_stats(load_vggt(preset="tiny"), _batches(1))
    rows = heavy_tail_rows("tiny", report)
    assert {(r["linear"], r["group"]) for r in rows} == {
        (lin, g) for lin in ("qkv", "proj", "fc1", "fc2") for g in ("special", "patch")
    }
    assert all(r["layers"] == 2 * load_vggt(preset="tiny").cfg.depth for r in rows)


def test_cli_compares_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = save_checkpoint(load_vggt(preset="tiny"), tmp_path / "tiny.safetensors")
    r = CliRunner().invoke(
        app, ["activation-stats", "--model", str(ckpt), "--model", "preset:tiny", "--out", str(tmp_path / "o"),
              "--scenes", "1", "--frames", "2", "--no-plots"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "/tiny | fc2 | special |" in r.output and "| tiny-untrained | fc2 | patch |" in r.output
    r = CliRunner().invoke(app, ["activation-stats", "--model", str(tmp_path / "nope.safetensors")])
    assert r.exit_code != 0 and "nope.safetensors" in r.output
