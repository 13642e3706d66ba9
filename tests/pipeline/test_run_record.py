"""What one quantized config's MLflow run records: its evaluation aggregates, retention, checkpoint size and the
calibration set it saw, picked out of a multi-model metrics.json by config name."""

from __future__ import annotations

import math

import pytest

from qvggt.pipeline.tracking import calibration_tags, config_metrics, eval_model_key

DOC = {
    "models": ["small/model", "rtn-w4a4/model", "rtn-w4a44/model"],
    "aggregate": {
        "small/model": {"pose_auc@30": 23.0},
        "rtn-w4a4/model": {"pose_auc@30": 20.0, "depth_abs_rel": 0.2, "n_scenes": 8, "note": "text is not a metric"},
        "rtn-w4a44/model": {"pose_auc@30": 1.0},
    },
    "comparison": {
        "rtn-w4a4/model": {"pose_auc@30": {"retention": 87.0, "diff": -3.0}, "depth_abs_rel": {"diff": 0.1}}
    },
}
MANIFEST = {"summary": {"weight_bytes_after": 1000, "compression": 3.5}, "calibration": None}


def test_config_metrics_of_one_config() -> None:
    # "rtn-w4a4" must not pick up "rtn-w4a44/model": keys are matched up to the "/".
    assert eval_model_key(DOC, "rtn-w4a4") == "rtn-w4a4/model"
    m = config_metrics(DOC, "rtn-w4a4", MANIFEST)
    assert m == {"pose_auc@30": 20.0, "depth_abs_rel": 0.2, "n_scenes": 8.0, "retention_pose_auc@30": 87.0,
                 "weight_bytes": 1000.0, "compression": 3.5}  # fmt: skip
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    with pytest.raises(ValueError, match="0 models of config 'gptq-w4a4'.*rtn-w4a4/model"):
        eval_model_key(DOC, "gptq-w4a4")


def test_calibration_tags_name_the_set_or_none() -> None:
    assert calibration_tags(MANIFEST) == {"calib_manifest_sha256": "none", "calib_samples": "0"}  # data-free (rtn)
    calibrated = {**MANIFEST, "calibration": {"manifest_sha256": "ab" * 32, "sample_ids": ["s/1", "s/2"]}}
    assert calibration_tags(calibrated) == {"calib_manifest_sha256": "ab" * 32, "calib_samples": "2"}
