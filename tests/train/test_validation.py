"""Held-out validation during training and its gate: the scores against known answers, the CSV, resumption."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation
from tiny_train import TINY_TRAIN
from torch import nn

from qvggt.config import DataConfig, TrainConfig
from qvggt.data.synthetic import CATEGORIES
from qvggt.geometry.pose_encoding import extri_intri_to_pose_encoding
from qvggt.model import load_vggt
from qvggt.train.correspondence import match_targets
from qvggt.train.data import SceneCache, build_cache
from qvggt.train.trainer import _append_metrics, train
from qvggt.train.validation import GateFailed, check_gate, gate_failed, validate, validation_scenes

CFG = TINY_TRAIN.model_copy(update={"checkpoint_every": 100, "val_every": 2, "val_scenes": 2})


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _without_yaw(extr: torch.Tensor) -> torch.Tensor:
    """Extrinsics [B, S, 3, 4] whose rotations relative to frame 0 lose their component about camera 0's y axis:
    what a monocular model can know (the change of elevation and roll), not the turn around the scene."""
    out = extr.clone().double()
    for b in range(out.shape[0]):
        R0 = out[b, 0, :, :3].numpy()
        rv = Rotation.from_matrix(out[b, 1:, :, :3].numpy() @ R0.T).as_rotvec()
        rv[:, 1] = 0.0
        out[b, 1:, :, :3] = torch.from_numpy(Rotation.from_rotvec(rv).as_matrix() @ R0)
    return out.float()


class _PoseOracle(nn.Module):
    """Answers each scene of a cache, in order, with its ground-truth poses (``mode="truth"``), identity poses
    (``"identity"``) or the truth without the relative yaw (``"no_yaw"``)."""

    def __init__(self, cache: SceneCache, mode: str, matcher: bool = False) -> None:
        super().__init__()
        self.cache, self.mode, self.seen, self.matcher = cache, mode, 0, matcher
        self.cfg = SimpleNamespace(patch_size=14)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.cache.batch(list(range(self.seen, self.seen + images.shape[0])))
        self.seen += images.shape[0]
        assert torch.equal(b["images"], images)  # validate feeds the cache's scenes in order
        extr = {
            "truth": lambda e: e,
            "identity": lambda e: torch.eye(3, 4).expand_as(e),
            "no_yaw": _without_yaw,
        }[self.mode](b["extrinsics"])
        out = {"pose_enc": extri_intri_to_pose_encoding(extr, b["intrinsics"], tuple(images.shape[-2:]))}
        if self.matcher:  # a perfect matcher: later frames' descriptors are the one-hot of their true match
            index, _ = match_targets(b, 14)
            n = index.shape[-1]
            out["match_descriptors"] = torch.cat(
                [torch.eye(n).expand(len(index), 1, n, n), F.one_hot(index, n).float()], 1
            )
        return out


def test_validation_scenes_are_their_own_split_in_all_categories() -> None:
    data = DataConfig()
    seeds, cats = validation_scenes(data, 9)
    assert seeds == list(range(210_000, 210_009)) and set(cats) == set(CATEGORIES)
    assert not set(seeds) & set(data.eval_seeds.seeds())  # never the benchmark's scenes
    with pytest.raises(ValueError, match="exceeds"):
        validation_scenes(DataConfig(), 20_000)


def test_scores_of_perfect_and_identity_poses(cache_root: Path) -> None:
    seeds, cats = validation_scenes(DataConfig(), 3)
    cache = SceneCache(build_cache(cache_root, seeds, cats, 3, 42, progress=False))
    perfect = validate(_PoseOracle(cache, "truth"), cache, step=7, batch_size=2)
    assert perfect.step == 7 and perfect.rot_median < 0.05 and perfect.pose_auc30 > 99
    assert perfect.rot_gain > 0.99 and np.isnan(perfect.depth_abs_rel)  # no depth head, no depth score
    assert perfect.yaw_corr > 0.999 and np.isnan(perfect.match_top1)  # no matcher, no match score
    matched = validate(_PoseOracle(cache, "truth", matcher=True), cache, step=7, batch_size=2)
    assert matched.match_top1 == 1.0
    identity = validate(_PoseOracle(cache, "identity"), cache, step=7)
    assert identity.rot_median == pytest.approx(identity.identity_rot_median, abs=1e-3)
    assert abs(identity.rot_gain) < 1e-4 and identity.identity_rot_median > 10  # these scenes do turn
    assert identity.yaw_corr == 0.0  # a constant prediction carries no yaw


def test_gate_on_yaw_stops_a_model_that_beats_identity_monocularly(cache_root: Path) -> None:
    seeds, cats = validation_scenes(DataConfig(), 4)
    cache = SceneCache(build_cache(cache_root, seeds, cats, 3, 42, progress=False))
    mono = validate(_PoseOracle(cache, "no_yaw"), cache, step=10)
    perfect = validate(_PoseOracle(cache, "truth"), cache, step=10)
    assert mono.rot_gain > 0.05 and mono.yaw_corr == 0.0  # beats identity without any yaw
    by_gain = TrainConfig(val_every=10, gate_step=10, gate_min_gain=0.05)
    by_yaw = by_gain.model_copy(update={"gate_min_yaw_corr": 0.3})
    assert not gate_failed(mono, by_gain) and gate_failed(mono, by_yaw) and not gate_failed(perfect, by_yaw)
    with pytest.raises(GateFailed, match=r"yaw correlation 0.00 is below train.gate_min_yaw_corr=0.30"):
        check_gate(mono, by_yaw)
    with pytest.raises(ValueError, match="gate_min_yaw_corr"):
        TrainConfig(gate_min_yaw_corr=1.5)


def test_validation_rows_gate_and_resume(tmp_path: Path, cache_root: Path) -> None:
    plain = train(CFG, DataConfig(), tmp_path / "a", tmp_path / "wa", cache_root, progress=False)
    with open(tmp_path / "a" / "validation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["identity_rot_median"]) > 0 and 0 < float(r["depth_abs_rel"]) < 10 for r in rows)
    assert all(-1 <= float(r["yaw_corr"]) <= 1 for r in rows)

    # A gate nobody passes stops the run at its step, resumable, with nothing exported ...
    gated = CFG.model_copy(update={"gate_step": 2, "gate_min_gain": 0.99})
    with pytest.raises(GateFailed, match="gate at step 2"):
        train(gated, DataConfig(), tmp_path / "b", tmp_path / "wb", cache_root, progress=False)
    assert torch.load(tmp_path / "wb" / "state.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "b" / "model.safetensors").exists()
    # ... a rerun with the same gate is judged again before spending any step ...
    with pytest.raises(GateFailed):
        train(gated, DataConfig(), tmp_path / "b", tmp_path / "wb", cache_root, progress=False)
    assert torch.load(tmp_path / "wb" / "state.pt", weights_only=True)["step"] == 2
    # ... and without it the run goes on (validation settings may change on resume) to the weights of a run that
    # was never validated: validating does not perturb training.
    resumed = train(CFG.model_copy(update={"val_every": 1}), DataConfig(), tmp_path / "b", tmp_path / "wb",
                    cache_root, progress=False)  # fmt: skip
    unvalidated = train(CFG.model_copy(update={"val_every": 0}), DataConfig(), tmp_path / "c", tmp_path / "wc",
                        cache_root, progress=False)  # fmt: skip
    for result in (resumed, unvalidated):
        wa, wb = load_vggt(plain.model_path).state_dict(), load_vggt(result.model_path).state_dict()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with open(tmp_path / "wb" / "validation.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 3, 4]


def test_gate_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="set train.val_every"):
        TrainConfig(gate_step=100)
    with pytest.raises(ValueError, match="num_frames >= 2"):
        TrainConfig(num_frames=1, val_every=10)


def test_a_csv_from_an_older_version_gains_the_new_columns(tmp_path: Path) -> None:
    # A run resumed across a version that added a column (yaw_corr) keeps its old rows and a consistent header.
    path = tmp_path / "validation.csv"
    path.write_text("step,rot_median\n2,30.0\n")
    _append_metrics(path, [{"step": 4, "rot_median": 20.0, "yaw_corr": 0.5}])
    _append_metrics(path, [{"step": 6, "rot_median": 10.0, "yaw_corr": 0.9}])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["rot_median"], r["yaw_corr"]) for r in rows] == [
        ("2", "30.0", ""),
        ("4", "20.0", "0.5"),
        ("6", "10.0", "0.9"),
    ]
