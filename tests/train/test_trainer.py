"""Training: a few real steps on a tiny preset; an interrupted run resumes to the same weights."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from tiny_train import TINY_TRAIN

from qvggt.config import DataConfig, TrainConfig
from qvggt.model import load_vggt
from qvggt.train.trainer import (
    batch_indices,
    frame_stride,
    init_model,
    lr_factor,
    param_groups,
    step_frames,
    train,
)

CFG = TINY_TRAIN


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_vggt(path).state_dict()


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path, cache_root: Path) -> None:
    full = train(CFG, DataConfig(), tmp_path / "a", tmp_path / "wa", cache_root, progress=False)
    assert full.steps == 4 and full.model_path.is_file()

    part = train(CFG, DataConfig(), tmp_path / "b", tmp_path / "wb", cache_root, stop_after=2, progress=False)
    assert part.steps == 2 and not part.model_path.exists()  # an interrupted run exports nothing
    resumed = train(CFG, DataConfig(), tmp_path / "b", tmp_path / "wb", cache_root, progress=False)
    assert resumed.steps == 4

    wa, wb = _weights(full.model_path), _weights(resumed.model_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # The resumed log equals the uninterrupted one, row for row (throughput aside).
    def rows(p: Path):
        with open(p / "metrics.csv") as f:
            return [{k: v for k, v in r.items() if k != "frames_per_s"} for r in csv.DictReader(f)]

    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert [int(r["step"]) for r in rows(tmp_path / "a")] == [1, 2, 3, 4]


def test_training_reduces_the_loss_on_a_fixed_batch(tmp_path: Path, cache_root: Path) -> None:
    cfg = CFG.model_copy(update={"steps": 12, "num_scenes": 1, "batch_size": 1, "checkpoint_every": 100})
    train(cfg, DataConfig(), tmp_path / "m", tmp_path / "w", cache_root, progress=False)
    with open(tmp_path / "m" / "metrics.csv") as f:
        losses = [float(r["objective"]) for r in csv.DictReader(f)]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0]


def test_resume_with_other_settings_is_refused(tmp_path: Path, cache_root: Path) -> None:
    train(CFG, DataConfig(), tmp_path / "o", tmp_path / "w", cache_root, stop_after=2, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(train\.lr: .* -> 0\.0005\)"):  # names what differs
        train(CFG.model_copy(update={"lr": 5e-4}), DataConfig(), tmp_path / "o", tmp_path / "w", cache_root,
              progress=False)  # fmt: skip
    # Other training scenes: refused too (the signature held only the train section before).
    other_scenes = DataConfig(train_seeds={"start": 1, "stop": 100_000})
    with pytest.raises(ValueError, match=r"data\.train_seeds"):
        train(CFG, other_scenes, tmp_path / "o", tmp_path / "w", cache_root, progress=False)
    # Logging and checkpoint cadence do not change the weights: the run resumes (and finishes) with others.
    relogged = CFG.model_copy(update={"log_every": 3, "checkpoint_every": 3})
    assert train(relogged, DataConfig(), tmp_path / "o", tmp_path / "w", cache_root, progress=False).steps == 4


def test_schedule_and_data_order() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)
    # Each epoch visits every scene once, in a seed-dependent order.
    order = [i for s in range(5) for i in batch_indices(s, 2, 10, seed=3)]
    assert sorted(order) == list(range(10))
    assert order != [i for s in range(5) for i in batch_indices(s, 2, 10, seed=4)]


def test_warm_restart_matches_a_continuation_of_the_finished_run() -> None:
    """restart_step=80 of 100: steps up to 80 follow the cosine of an 80-step run; from there the rate of the
    session-9 continuation (scripts/issue4/continue_full.py: restart_lr_ratio x lr decaying to the run's minimum)."""
    short = TrainConfig(steps=80, warmup_steps=10, min_lr_ratio=0.1)
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1, restart_step=80, restart_lr_ratio=0.4)
    assert [lr_factor(k, cfg) for k in range(80)] == [lr_factor(k, short) for k in range(80)]
    lr, base = 0.4 * cfg.lr, cfg.lr  # the continuation's own formula, as an absolute rate
    f = cfg.min_lr_ratio * base / lr
    cont = [lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * k / 20))) / base for k in range(20)]
    assert [lr_factor(80 + k, cfg) for k in range(20)] == pytest.approx(cont)
    assert lr_factor(79, cfg) == pytest.approx(0.1, abs=1e-3) and lr_factor(80, cfg) == pytest.approx(0.4)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    # Without a restart the signature is what it was before the option existed (old runs still resume).
    assert "restart" not in short.training_signature() and '"restart_step":80' in cfg.training_signature()
    for bad in (5, 10, 100, 150):
        with pytest.raises(ValueError, match="train.restart_step"):
            TrainConfig(steps=100, warmup_steps=10, restart_step=bad)


def test_frame_windows_from_longer_trajectories_resume_exactly(tmp_path: Path, cache_root: Path) -> None:
    """Issue 4's baseline control: 2 of 4 rendered frames, a growing stride, a faster camera head; resumable."""
    cfg = CFG.model_copy(
        update={
            "render_frames": 4,
            "frame_stride": 1,
            "frame_stride_end": 3,
            "camera_lr_mult": 4.0,
            "camera_only_steps": 2,
        }
    )
    full = train(cfg, DataConfig(), tmp_path / "a", tmp_path / "wa", cache_root, progress=False)
    train(cfg, DataConfig(), tmp_path / "b", tmp_path / "wb", cache_root, stop_after=2, progress=False)
    resumed = train(cfg, DataConfig(), tmp_path / "b", tmp_path / "wb", cache_root, progress=False)
    wa, wb = _weights(full.model_path), _weights(resumed.model_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with open(tmp_path / "a" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # Camera-only warm-up for 2 steps: no dense losses logged, then the full objective.
    assert [r["loss_reg_depth"] == "nan" for r in rows] == [True, True, False, False]
    assert all(r["loss_camera"] != "nan" for r in rows)


def test_frame_schedule_and_camera_lr_groups() -> None:
    cfg = TrainConfig(steps=101, warmup_steps=1, num_frames=4, render_frames=16, frame_stride=1, frame_stride_end=5)
    assert [frame_stride(s, cfg) for s in (0, 50, 100)] == [1, 3, 5]
    f0 = step_frames(0, cfg)
    assert f0.shape == (cfg.batch_size, 4) and (f0 == step_frames(0, cfg)).all()  # a function of (seed, step)
    assert (step_frames(100, cfg)[:, 1:] - step_frames(100, cfg)[:, :-1] == 5).all()
    assert step_frames(0, TrainConfig()) is None  # default: every rendered frame, as before
    with pytest.raises(ValueError, match="render_frames"):
        TrainConfig(num_frames=4, render_frames=8, frame_stride=3)
    with pytest.raises(ValueError, match="need train.render_frames"):
        TrainConfig(frame_stride=2)

    tiny = CFG.model_copy(update={"camera_lr_mult": 10.0})
    model = init_model(tiny)
    groups = param_groups(model, tiny)
    camera = {id(p) for n, p in model.named_parameters() if n.startswith("camera_head.") or n.endswith("camera_token")}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= camera or not ids & camera
        assert g["lr"] == pytest.approx(tiny.lr * (10 if ids <= camera else 1))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(param_groups(model, CFG)) == 2  # default: the two weight-decay groups only


def test_token_init_std_sets_the_special_tokens_only() -> None:
    base, wide = init_model(CFG), init_model(CFG.model_copy(update={"token_init_std": 0.5}))
    agg = wide.aggregator
    for token in (agg.camera_token, agg.register_token):
        assert 0.4 < float(token.detach().std()) < 0.6
    # The reference frame's slot now differs from the other frames' by O(1), not O(1e-6).
    assert float((agg.camera_token[:, 0] - agg.camera_token[:, 1]).detach().norm()) > 1.0
    assert float((base.aggregator.camera_token[:, 0] - base.aggregator.camera_token[:, 1]).detach().norm()) < 1e-4
    same = {k: v for k, v in base.state_dict().items() if not k.endswith(("camera_token", "register_token"))}
    assert all(torch.equal(v, wide.state_dict()[k]) for k, v in same.items())
    again = init_model(CFG.model_copy(update={"token_init_std": 0.5}))
    assert torch.equal(agg.camera_token, again.aggregator.camera_token)  # drawn from the seeded generator
