"""Training: a few real steps on a tiny preset; an interrupted run resumes to the same weights."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from qvggt.config import DataConfig, TrainConfig
from qvggt.model import load_vggt
from qvggt.train.trainer import batch_indices, lr_factor, train

CFG = TrainConfig(
    preset="tiny",
    steps=4,
    batch_size=2,
    num_frames=2,
    image_size=42,
    num_scenes=3,
    warmup_steps=1,
    checkpoint_every=2,
    log_every=1,
    lr=1e-3,
    threads=1,
)


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
    with pytest.raises(ValueError, match="other train settings"):
        train(
            CFG.model_copy(update={"lr": 5e-4}),
            DataConfig(),
            tmp_path / "o",
            tmp_path / "w",
            cache_root,
            progress=False,
        )


def test_schedule_and_data_order() -> None:
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)
    # Each epoch visits every scene once, in a seed-dependent order.
    order = [i for s in range(5) for i in batch_indices(s, 2, 10, seed=3)]
    assert sorted(order) == list(range(10))
    assert order != [i for s in range(5) for i in batch_indices(s, 2, 10, seed=4)]
