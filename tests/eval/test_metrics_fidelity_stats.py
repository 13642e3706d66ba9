"""Quantization-fidelity metrics and the statistics helpers (paired bootstrap, retention)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from qvggt.eval.metrics import fidelity_metrics, paired_bootstrap, pose_auc, pose_errors, rel_l2, retention
from qvggt.geometry.pose_encoding import extri_intri_to_pose_encoding

S, H, W = 4, 6, 8


def _preds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    R = Rotation.random(S, random_state=seed).as_matrix()
    extr = np.concatenate([R, rng.normal(size=(S, 3, 1))], -1)
    K = np.tile(np.array([[300.0, 0, W / 2], [0, 300.0, H / 2], [0, 0, 1]]), (S, 1, 1))
    enc = extri_intri_to_pose_encoding(torch.from_numpy(extr), torch.from_numpy(K), (H, W)).double().numpy()
    return {
        "depth": rng.uniform(1, 3, size=(S, H, W, 1)),
        "world_points": rng.normal(size=(S, H, W, 3)),
        "pose_enc": enc,
        "extrinsic": extr,
    }


def test_rel_l2_values() -> None:
    b = np.array([3.0, 4.0])
    assert rel_l2(b, b) == 0.0
    assert rel_l2(1.1 * b, b) == pytest.approx(0.1)
    assert rel_l2(torch.tensor([3.0, 5.0]), b) == pytest.approx(0.2)
    assert rel_l2(np.zeros(2), np.zeros(2)) == 0.0 and rel_l2(b, np.zeros(2)) == math.inf
    assert rel_l2(np.array([np.nan, 4.0]), b) == math.inf
    with pytest.raises(ValueError, match="equal shapes"):
        rel_l2(b, b[:1])
    with pytest.raises(ValueError, match="reference"):
        rel_l2(b, np.array([np.inf, 1.0]))


def test_identical_outputs_have_perfect_fidelity() -> None:
    fp = _preds()
    m = fidelity_metrics(fp, fp)
    assert m == {
        "fid_rel_l2_depth": 0.0,
        "fid_rel_l2_world_points": 0.0,
        "fid_rel_l2_pose_enc": 0.0,
        "fid_pose_auc@30": pytest.approx(100.0),
    }


def test_known_deviation_and_pose_from_encoding() -> None:
    fp = _preds()
    q = {k: v.copy() for k, v in fp.items()}
    q["depth"] = 1.05 * fp["depth"][..., 0]  # [S,H,W] against [S,H,W,1]
    q["world_points"] = 0.9 * fp["world_points"]
    q["extrinsic"][1] = Rotation.from_euler("y", 20, degrees=True).as_matrix() @ fp["extrinsic"][1]
    m = fidelity_metrics(q, fp)
    assert m["fid_rel_l2_depth"] == pytest.approx(0.05)
    assert m["fid_rel_l2_world_points"] == pytest.approx(0.1)
    assert m["fid_pose_auc@30"] == pytest.approx(pose_auc(*pose_errors(q["extrinsic"], fp["extrinsic"]), 30))
    assert m["fid_pose_auc@30"] < 100.0
    # without `extrinsic` both sides decode pose_enc: identical encodings -> AUC 100, batch dim of 1 accepted
    q2 = {"pose_enc": fp["pose_enc"][None]}
    fp2 = {"pose_enc": torch.from_numpy(fp["pose_enc"][None])}
    m2 = fidelity_metrics(q2, fp2)
    assert m2["fid_pose_auc@30"] == pytest.approx(100.0) and m2["fid_rel_l2_pose_enc"] == 0.0
    # decoded pose_enc agrees with the extrinsics it was made from
    only_enc = {"pose_enc": fp["pose_enc"]}
    assert fidelity_metrics(only_enc, {"extrinsic": fp["extrinsic"]})["fid_pose_auc@30"] == pytest.approx(100.0)


def test_missing_outputs_single_frame_and_nan() -> None:
    fp = _preds()
    m = fidelity_metrics({"depth": fp["depth"]}, fp)
    assert m["fid_rel_l2_depth"] == 0.0
    assert all(math.isnan(m[k]) for k in ("fid_rel_l2_world_points", "fid_rel_l2_pose_enc", "fid_pose_auc@30"))
    one = {"extrinsic": fp["extrinsic"][:1]}
    assert math.isnan(fidelity_metrics(one, one)["fid_pose_auc@30"])
    q = {k: v.copy() for k, v in fp.items()}
    q["world_points"][0, 0, 0, 0] = np.nan
    q["extrinsic"][2] = np.nan
    m = fidelity_metrics(q, fp)
    assert m["fid_rel_l2_world_points"] == math.inf
    assert m["fid_pose_auc@30"] == pytest.approx(50.0)  # 3 of 6 pairs involve camera 2


def test_bootstrap_constant_shift() -> None:
    a = np.arange(20) / 4.0
    r = paired_bootstrap(a, a + 0.5)
    assert r == {"mean_diff": 0.5, "low": 0.5, "high": 0.5}


def test_bootstrap_noisy_shift_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = a + 0.5 + rng.normal(scale=0.2, size=40)
    r = paired_bootstrap(a, b, seed=1)
    assert r["low"] < 0.5 < r["high"] and r["low"] < r["mean_diff"] < r["high"]
    assert r["high"] - r["low"] < 0.2
    assert paired_bootstrap(torch.from_numpy(a), b, seed=1) == r
    assert paired_bootstrap(a, b, seed=2) != r
    wide = paired_bootstrap(a, b, seed=1, ci=0.99)
    assert wide["low"] <= r["low"] and wide["high"] >= r["high"]


def test_bootstrap_bad_inputs() -> None:
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="non-finite"):
        paired_bootstrap([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="ci must be"):
        paired_bootstrap([1.0], [2.0], ci=1.0)


def test_retention() -> None:
    assert retention(45.0, 90.0) == pytest.approx(50.0)
    assert math.isnan(retention(1.0, 0.0))
    r = retention(np.array([10.0, 5.0]), np.array([20.0, 0.0]))
    assert r[0] == pytest.approx(50.0) and math.isnan(r[1])
