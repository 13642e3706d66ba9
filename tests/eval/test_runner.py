"""The evaluation runner: real metrics on real predictors, resumable by scene, refusing calibration samples."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from co3d_tiny import multi_layout, write_tiny_co3d

from qvggt.eval.command import run_eval
from qvggt.eval.datasets import Co3DDataset, EvalSample, SyntheticEvalDataset
from qvggt.eval.runner import TrivialBaseline, evaluate, format_table, select_samples, summarise
from qvggt.model import load_vggt, save_checkpoint


@dataclass
class Oracle:
    """Predicts the ground truth exactly."""

    name: str = "oracle"

    def __call__(self, sample: EvalSample) -> dict[str, np.ndarray]:
        conf = np.ones(sample.depth.shape, np.float32)
        return {
            "extrinsic": sample.extrinsics,
            "intrinsic": sample.intrinsics,
            "depth": sample.depth,
            "depth_conf": conf,
            "world_points": sample.world_points,
            "world_points_conf": conf,
        }


@dataclass
class Flaky:
    """The baseline, but crashes on the scene with index ``crash_at`` (a killed run)."""

    crash_at: int
    name: str = "baseline:identity+plane"
    calls: int = 0

    def __call__(self, sample: EvalSample) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.calls - 1 == self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        return TrivialBaseline()(sample)


@pytest.fixture(scope="module")
def dataset() -> SyntheticEvalDataset:
    return SyntheticEvalDataset(seeds=[200_000, 200_001, 200_002], num_frames=3, height=42, width=42)


def test_oracle_is_perfect_and_baseline_is_not(dataset, tmp_path: Path) -> None:
    result = evaluate(dataset, [Oracle(), TrivialBaseline()], tmp_path, progress=False)
    oracle, base = result.aggregate["oracle"], result.aggregate["baseline:identity+plane"]
    assert oracle["pose_auc@30"] == pytest.approx(100.0)
    assert oracle["depth_abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert oracle["pm_chamfer"] == pytest.approx(0.0, abs=1e-4)
    assert oracle["dpm_chamfer"] == pytest.approx(0.0, abs=1e-4)
    assert base["pose_auc@30"] < 60 and base["depth_abs_rel"] > 0.05
    # The baseline's points are its plane unprojected with its identity cameras: both clouds are the same.
    assert base["dpm_chamfer"] == pytest.approx(base["pm_chamfer"], rel=1e-5)
    # The baseline vs the oracle: fidelity and retention are computed against the first model.
    assert result.comparison["baseline:identity+plane"]["pose_auc@30"]["retention"] < 60
    assert "fid_rel_l2_depth" in base
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["models"] == ["oracle", "baseline:identity+plane"]
    assert "| pose_auc@30 |" in format_table(result)


def test_depth_cloud_sees_wrong_cameras_the_point_map_does_not(dataset) -> None:
    from qvggt.eval.runner import score_sample

    sample = dataset.load(dataset.sample_ids()[0])
    preds = Oracle()(sample)
    preds["extrinsic"] = preds["extrinsic"].copy()
    preds["extrinsic"][1:, :, 3] += 0.5  # exact depth and points, cameras off
    metrics = score_sample(sample, preds)["metrics"]
    assert metrics["pm_chamfer"] < 1e-4 and metrics["dpm_chamfer"] > 0.01


def test_a_killed_run_resumes_and_matches_a_clean_run(dataset, tmp_path: Path) -> None:
    clean = evaluate(dataset, [Oracle(), TrivialBaseline()], tmp_path / "clean", progress=False)
    with pytest.raises(KeyboardInterrupt):
        evaluate(dataset, [Oracle(), Flaky(crash_at=1)], tmp_path / "resumed", progress=False)
    lines = (tmp_path / "resumed" / "scenes.jsonl").read_text().splitlines()
    assert len(lines) == 1  # the finished scene was kept
    # A torn last line (killed mid-write) is dropped, not trusted.
    with open(tmp_path / "resumed" / "scenes.jsonl", "a") as f:
        f.write('{"index": 1, "sample_id": "synth')
    flaky = Flaky(crash_at=-1)
    resumed = evaluate(dataset, [Oracle(), flaky], tmp_path / "resumed", progress=False)
    assert flaky.calls == 2  # only the two unfinished scenes ran
    assert json.dumps(resumed.aggregate, sort_keys=True) == json.dumps(clean.aggregate, sort_keys=True)  # NaN-safe


def test_refuses_calibration_samples_and_other_runs(dataset, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="used for calibration"):
        evaluate(dataset, [Oracle()], tmp_path, exclude_ids=[dataset.sample_ids()[1]], progress=False)
    evaluate(dataset, [Oracle()], tmp_path / "a", max_scenes=1, progress=False)
    with pytest.raises(ValueError, match="different evaluation"):
        evaluate(dataset, [Oracle(), TrivialBaseline()], tmp_path / "a", max_scenes=1, progress=False)
    with pytest.raises(ValueError, match="unique"):
        evaluate(dataset, [Oracle(), Oracle()], tmp_path / "b", progress=False)


# ------------------------------------------------------------------ multi-category Co3D: caps and leakage

CATS = ("apple", "bench", "cup", "frisbee")  # frisbee is not one of VGGT's 41


@pytest.fixture(scope="module")
def co3d_multi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_co3d(tmp_path_factory.mktemp("co3d_multi"), multi_layout(CATS, n_test=3, n_train=2))


def test_scene_cap_spreads_over_categories(co3d_multi: Path, tmp_path: Path) -> None:
    ds = Co3DDataset(co3d_multi, min_sequence_length=10, target_size=28)
    assert ds.categories == ["apple", "bench", "cup"] and len(ds) == 9
    picked = select_samples(ds, 4)
    # One per category first, then the second of the first category; dataset order kept.
    assert [sid.split("/")[1:3] for sid in picked] == [["apple", "t0"], ["apple", "t1"], ["bench", "t0"], ["cup", "t0"]]
    assert select_samples(ds, 2) == [ds.sample_ids()[0], ds.sample_ids()[3]]
    assert select_samples(ds, None) == select_samples(ds, 100) == ds.sample_ids()
    result = evaluate(ds, [TrivialBaseline()], tmp_path, max_scenes=4, progress=False)
    assert sorted({r["category"] for r in result.records}) == ["apple", "bench", "cup"]


def test_leakage_check_matches_sequences_not_frame_draws(co3d_multi: Path, tmp_path: Path) -> None:
    """A sequence calibrated at 4 frames and evaluated at 10 is the same scene: refused."""
    calib = Co3DDataset(co3d_multi, min_sequence_length=10, num_frames=4, target_size=28, categories=["bench"])
    test = Co3DDataset(co3d_multi, min_sequence_length=10, num_frames=10, target_size=28, categories=["bench"])
    assert not set(calib.sample_ids()) & set(test.sample_ids())  # the ids differ: an exact match would miss it
    with pytest.raises(ValueError, match="scenes used for calibration.*co3d/bench/t1/frames-"):
        evaluate(test, [TrivialBaseline()], tmp_path, exclude_ids=[calib.sample_ids()[1]], progress=False)
    other = Co3DDataset(co3d_multi, split="train", min_sequence_length=10, num_frames=4, target_size=28)
    evaluate(test, [TrivialBaseline()], tmp_path, exclude_ids=other.sample_ids(), max_scenes=1, progress=False)


# ----------------------------------------------------------------------------------- resume signature


def test_resume_only_the_same_weights_settings_and_precision(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = load_vggt(preset="tiny")
    ckpt = save_checkpoint(model, tmp_path / "m" / "model.safetensors")
    out = tmp_path / "eval"
    kw = {"frames": 2, "scenes": 1, "progress": False}
    first = run_eval(str(ckpt), [], "synthetic:eval", out, **kw)
    saved = out / "predictions" / "0.npz"
    stamp = saved.stat().st_mtime_ns
    # Same everything: resumes from the finished scene (nothing recomputed, same numbers).
    again = run_eval(str(ckpt), [], "synthetic:eval", out, **kw)
    assert saved.stat().st_mtime_ns == stamp
    assert json.dumps(again.aggregate, sort_keys=True) == json.dumps(first.aggregate, sort_keys=True)
    # Other frame count or precision: a different evaluation.
    with pytest.raises(ValueError, match=r"different evaluation.*settings"):
        run_eval(str(ckpt), [], "synthetic:eval", out, **{**kw, "frames": 3})
    with pytest.raises(ValueError, match=r"different evaluation.*models"):
        run_eval(str(ckpt), [], "synthetic:eval", out, dtype="bfloat16", **kw)
    # Retrained weights saved at the same path: refused, not answered with the old numbers.
    with torch.no_grad():
        next(model.camera_head.parameters()).add_(1e-3)
    save_checkpoint(model, ckpt)
    with pytest.raises(ValueError, match=r"holds a different evaluation.*models.*use another --out"):
        run_eval(str(ckpt), [], "synthetic:eval", out, **kw)
    assert saved.stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------- bootstrap accounting


def test_non_finite_pairs_are_counted_not_silently_dropped() -> None:
    def record(i: int, ref: float, other: float) -> dict:
        return {"index": i, "category": "c", "models": {"a": {"metrics": {"depth_abs_rel": ref}},
                                                         "b": {"metrics": {"depth_abs_rel": other}}}}  # fmt: skip

    records = [record(0, 0.1, 0.2), record(1, 0.1, math.nan), record(2, 0.2, 0.4)]
    entry = summarise(records, ["a", "b"]).comparison["b"]["depth_abs_rel"]
    assert entry["mean_diff"] == pytest.approx(0.15) and entry["dropped_pairs"] == 1
    clean = summarise([records[0], records[2]], ["a", "b"]).comparison["b"]["depth_abs_rel"]
    assert "dropped_pairs" not in clean
