"""Matcher training: ground-truth patch matches from rendered geometry, the InfoNCE loss, the phased trainer."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_train import TINY_TRAIN

from qvggt.config import DataConfig, TrainConfig
from qvggt.data.synthetic import make_batch
from qvggt.model import load_vggt
from qvggt.train.correspondence import match_targets, matching_loss
from qvggt.train.data import select_frames
from qvggt.train.trainer import init_model, train

PS = 14


@pytest.fixture(scope="module")
def scenes() -> dict[str, torch.Tensor]:
    """Two normalised 4-frame scenes at 126 px (a 9 x 9 patch grid), as the training cache serves them."""
    b = make_batch([3, 4], 4, 126, 126)
    return {
        k: torch.from_numpy(np.ascontiguousarray(b[k]))
        for k in ("images", "depth", "world_points", "valid_mask", "extrinsics", "intrinsics")
    }


def test_a_frame_matched_to_itself_maps_each_patch_to_itself(scenes) -> None:
    same = select_frames(scenes, np.array([[0, 0], [0, 0]]))
    index, visible = match_targets(same, PS)
    centre_valid = same["valid_mask"][:, 0, PS // 2 :: PS, PS // 2 :: PS].reshape(2, 1, -1)
    assert visible.float().mean() > 0.9 * centre_valid.float().mean()
    assert bool((visible <= centre_valid).all())  # never a match on the sky
    own = torch.arange(81).expand_as(index)
    assert torch.equal(index[visible], own[visible])


def test_matches_land_where_frame_zero_sees_the_same_point(scenes) -> None:
    """Checked against frame 0's own point map, not the projection the targets use: the target patch of frame 0
    holds a pixel whose surface point is the matched one."""
    index, visible = match_targets(scenes, PS)
    assert index.shape == (2, 3, 81) and 0.2 < visible.float().mean() < 0.95
    pts = scenes["world_points"]
    patches0 = pts[:, 0].reshape(2, 9, PS, 9, PS, 3).permute(0, 1, 3, 2, 4, 5).reshape(2, 81, PS * PS, 3)
    centres = pts[:, 1:, PS // 2 :: PS, PS // 2 :: PS].reshape(2, 3, 81, 3)
    b, k, n = visible.nonzero(as_tuple=True)
    target_pixels = patches0[b, index[b, k, n]]  # [M, PS*PS, 3]
    nearest = (target_pixels - centres[b, k, n][:, None]).norm(dim=-1).min(-1).values
    assert float((nearest < 0.03).float().mean()) > 0.97


def test_infonce_is_low_and_exact_for_descriptors_that_encode_the_truth(scenes) -> None:
    index, _ = match_targets(scenes, PS)
    frame0 = torch.eye(81).expand(2, 1, 81, 81)
    later = F.one_hot(index, 81).float()
    loss, top1 = matching_loss(torch.cat([frame0, later], 1), scenes, PS, temperature=0.05)
    assert top1 == 1.0 and float(loss) < 1e-6
    noise = F.normalize(torch.randn(2, 4, 81, 81, generator=torch.Generator().manual_seed(0)), dim=-1)
    loss_noise, top1_noise = matching_loss(noise, scenes, PS, temperature=0.05)
    assert top1_noise < 0.1 and float(loss_noise) > 1.0


def test_targets_need_two_frames(scenes) -> None:
    with pytest.raises(ValueError, match="at least 2 frames"):
        match_targets(select_frames(scenes, np.array([[0], [0]])), PS)


def test_config_refuses_matcher_settings_without_the_option() -> None:
    with pytest.raises(ValueError, match="set train.correspondence_tokens"):
        TrainConfig(matcher_steps=10)
    with pytest.raises(ValueError, match="matcher_steps"):
        TrainConfig(correspondence_tokens=True, matcher_steps=2000, steps=2000)


CORR = TINY_TRAIN.model_copy(update={"correspondence_tokens": True, "matcher_steps": 2, "camera_only_steps": 3})


def test_phases_train_the_matcher_first_and_resume_exactly(tmp_path: Path) -> None:
    """Steps 1-2 train the matcher alone (nothing else moves), step 3 the camera path too, step 4 everything; an
    interrupted run resumes to the same weights."""
    cache = tmp_path / "cache"
    part = train(CORR, DataConfig(), tmp_path / "b", tmp_path / "wb", cache, stop_after=2, progress=False)
    assert part.steps == 2
    after_matcher = torch.load(tmp_path / "wb" / "state.pt", weights_only=True)["model"]
    init = init_model(CORR).state_dict()
    moved = {k for k in init if not torch.equal(init[k], after_matcher[k])}
    assert moved and all(k.startswith("correspondence.matcher.") for k in moved)

    full = train(CORR, DataConfig(), tmp_path / "a", tmp_path / "wa", cache, progress=False)
    resumed = train(CORR, DataConfig(), tmp_path / "b", tmp_path / "wb", cache, progress=False)
    wa, wb = load_vggt(full.model_path).state_dict(), load_vggt(resumed.model_path).state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.startswith("correspondence.") for k in wa)

    with open(tmp_path / "a" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["loss_camera"] == "nan" for r in rows] == [True, True, False, False]
    assert [r["loss_reg_depth"] == "nan" for r in rows] == [True, True, True, False]
    assert all(float(r["loss_match"]) > 0 for r in rows)


def test_matcher_phase_learns_matches_on_fixed_scenes(tmp_path: Path) -> None:
    """A real optimisation: InfoNCE on one 2-scene batch raises the argmax matches' accuracy well above chance."""
    cfg = CORR.model_copy(
        update={"steps": 16, "matcher_steps": 15, "camera_only_steps": 0, "num_scenes": 2, "image_size": 126,
                "lr": 2e-3, "warmup_steps": 2, "log_every": 1, "checkpoint_every": 100}
    )  # fmt: skip
    train(cfg, DataConfig(), tmp_path / "m", tmp_path / "w", tmp_path / "cache", progress=False)
    with open(tmp_path / "m" / "metrics.csv") as f:
        top1 = [float(r["match_top1"]) for r in csv.DictReader(f)]
    assert top1[0] < 0.15 and np.mean(top1[-3:]) > 0.8  # chance is 1/81


def test_a_projection_lands_in_the_pixel_it_rounds_to() -> None:
    """Pixel centres sit on integer coordinates (qvggt.data.synthetic): a point projecting to u = 13.7 is pixel 14,
    the first of the second patch column, not pixel 13 (floor), the last of the first."""
    h = w = 2 * PS
    f, c = 20.0, w / 2
    point = torch.tensor([(13.7 - c) / f, (7.0 - c) / f, 1.0])  # projects to (u, v) = (13.7, 7.0) at depth 1
    batch = {
        "world_points": point.expand(1, 2, h, w, 3).clone(),
        "valid_mask": torch.ones(1, 2, h, w, dtype=torch.bool),
        "depth": torch.ones(1, 2, h, w),
        "intrinsics": torch.tensor([[f, 0, c], [0, f, c], [0, 0, 1]]).expand(1, 2, 3, 3),
    }
    index, visible = match_targets(batch, PS)
    assert bool(visible.all()) and bool((index == 1).all())  # patch (row 0, column 1)
    batch["world_points"][..., 0] = (w - 0.4 - c) / f  # u = W - 0.4: outside the image's last pixel
    assert not bool(match_targets(batch, PS)[1].any())
