"""The evaluation runner: real metrics on real predictors, resumable by scene, refusing calibration samples."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qvggt.eval.datasets import EvalSample, SyntheticEvalDataset
from qvggt.eval.runner import TrivialBaseline, evaluate, format_table


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
