"""Held-out validation during training and its gate: the scores against known answers, the CSV, resumption."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_train import TINY_TRAIN
from torch import nn

from qvggt.config import DataConfig, TrainConfig
from qvggt.data.synthetic import CATEGORIES
from qvggt.geometry.pose_encoding import extri_intri_to_pose_encoding
from qvggt.model import load_vggt
from qvggt.train.data import SceneCache, build_cache
from qvggt.train.trainer import train
from qvggt.train.validation import GateFailed, validate, validation_scenes

CFG = TINY_TRAIN.model_copy(update={"checkpoint_every": 100, "val_every": 2, "val_scenes": 2})


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


class _PoseOracle(nn.Module):
    """Answers each scene of a cache, in order, with its ground-truth poses (``truth=True``) or identity poses."""

    def __init__(self, cache: SceneCache, truth: bool) -> None:
        super().__init__()
        self.cache, self.truth, self.seen = cache, truth, 0

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.cache.batch(list(range(self.seen, self.seen + images.shape[0])))
        self.seen += images.shape[0]
        assert torch.equal(b["images"], images)  # validate feeds the cache's scenes in order
        extr = b["extrinsics"] if self.truth else torch.eye(3, 4).expand_as(b["extrinsics"])
        return {"pose_enc": extri_intri_to_pose_encoding(extr, b["intrinsics"], tuple(images.shape[-2:]))}


def test_validation_scenes_are_the_eval_split_in_all_categories() -> None:
    seeds, cats = validation_scenes(DataConfig(), 9)
    assert seeds == list(range(200_000, 200_009)) and set(cats) == set(CATEGORIES)
    with pytest.raises(ValueError, match="exceeds"):
        validation_scenes(DataConfig(), 20_000)


def test_scores_of_perfect_and_identity_poses(cache_root: Path) -> None:
    seeds, cats = validation_scenes(DataConfig(), 3)
    cache = SceneCache(build_cache(cache_root, seeds, cats, 3, 42, progress=False))
    perfect = validate(_PoseOracle(cache, truth=True), cache, step=7, batch_size=2)
    assert perfect.step == 7 and perfect.rot_median < 0.05 and perfect.pose_auc30 > 99
    assert perfect.rot_gain > 0.99 and np.isnan(perfect.depth_abs_rel)  # no depth head, no depth score
    identity = validate(_PoseOracle(cache, truth=False), cache, step=7)
    assert identity.rot_median == pytest.approx(identity.identity_rot_median, abs=1e-3)
    assert abs(identity.rot_gain) < 1e-4 and identity.identity_rot_median > 10  # these scenes do turn


def test_validation_rows_gate_and_resume(tmp_path: Path, cache_root: Path) -> None:
    plain = train(CFG, DataConfig(), tmp_path / "a", tmp_path / "wa", cache_root, progress=False)
    with open(tmp_path / "a" / "validation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["identity_rot_median"]) > 0 and 0 < float(r["depth_abs_rel"]) < 10 for r in rows)

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
