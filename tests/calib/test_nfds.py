"""NFDS through a real tiny VGGT: planted outliers are filtered, frame features ignore the order of frames
1..S-1, and the k-means selection is seeded, thread-independent and never picks a filtered sample."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from qvggt.calib.nfds import (
    deep_layer_features,
    default_feature_layers,
    iqr_outliers,
    pool_features,
    select_calibration,
    select_calibration_detailed,
)
from qvggt.eval.datasets import EvalSample, SyntheticEvalDataset
from qvggt.model import build_model, get_preset

N_CLEAN = 16


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("tiny")).eval()


def _planted(samples: list[EvalSample]) -> list[EvalSample]:
    """Blown-out exposure, blank frames and uniform noise, each built from a clean sample."""
    noise = np.random.default_rng(0).random(samples[2].images.shape).astype(np.float32)
    return [
        replace(samples[0], sample_id="planted/blown", images=np.clip(samples[0].images * 8, 0, 1)),
        replace(samples[1], sample_id="planted/blank", images=np.zeros_like(samples[1].images)),
        replace(samples[2], sample_id="planted/noise", images=noise),
    ]


@pytest.fixture(scope="module")
def pool() -> list[EvalSample]:
    clean = list(SyntheticEvalDataset.from_config(N_CLEAN, split="calib", num_frames=3, height=42, width=42))
    return clean + _planted(clean)


@pytest.fixture(scope="module")
def feats(tiny: nn.Module, pool: list[EvalSample]):
    return pool_features(tiny, pool)


def test_feature_shapes_and_layers(feats) -> None:
    assert default_feature_layers(24) == [20, 21, 22, 23]
    assert feats.layers == [0, 1, 2, 3]  # tiny has depth 4
    assert feats.deep.shape == (N_CLEAN + 3, 16) and feats.deep_names[:2] == ["frame.0.mean", "frame.0.std"]
    assert feats.frame.shape[0] == N_CLEAN + 3 and np.isfinite(feats.frame).all()


def test_planted_outliers_removed_clean_kept(feats) -> None:
    flags = iqr_outliers(feats.deep, feats.categories)
    ids = np.asarray(feats.sample_ids)
    assert flags[ids == "planted/blown"].all() and flags[ids == "planted/blank"].all()
    # Tukey's rule on any of 16 statistics flags some clean samples too; most must survive.
    assert flags[:N_CLEAN].sum() <= 4
    picked = select_calibration(feats.frame, flags, n_clusters=3, n_per_cluster=4, seed=0, n_init=4, mode="nfds")
    assert not set(picked) & set(np.flatnonzero(flags).tolist())


def test_iqr_rule_and_category_fallback() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(size=(12, 2))
    v[3, 1] = 50.0
    flags = iqr_outliers(v)
    assert flags[3] and flags.sum() <= 2
    # 12 samples of "a" + 4 of "b" shifted by 100: judged by its own quartiles, "b" is fine.
    cats = ["a"] * 12 + ["b"] * 4
    w = np.r_[np.linspace(0.0, 1.0, 12), 100.0 + np.linspace(0.0, 0.3, 4)][:, None]
    assert not iqr_outliers(w, cats).any()
    # "b" with 3 samples falls back to the global quartiles ("a" dominates them): flagged.
    assert iqr_outliers(w[:15], cats[:15])[12:].all()
    nan = v.copy()
    nan[0, 0] = np.nan
    assert iqr_outliers(nan)[0]


def test_frame_feature_ignores_order_of_frames_1_to_S(tiny: nn.Module) -> None:
    sample = next(iter(SyntheticEvalDataset.from_config(1, split="calib", num_frames=4, height=42, width=42)))
    base = deep_layer_features(tiny, sample.images)
    perm = sample.images[[0, 3, 1, 2]]
    other = deep_layer_features(tiny, perm)
    np.testing.assert_allclose(other["frame"], base["frame"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(other["deep"], base["deep"], atol=1e-6, rtol=0)
    # Frame 0 is the reference: swapping it out changes the feature.
    assert np.abs(deep_layer_features(tiny, sample.images[[1, 0, 2, 3]])["frame"] - base["frame"]).max() > 1e-4


def test_selection_seeded_and_modes(feats) -> None:
    flags = iqr_outliers(feats.deep, feats.categories)
    x = feats.frame
    a = select_calibration(x, flags, 3, 2, seed=0, n_init=4, mode="nfds")
    assert a == select_calibration(x, flags, 3, 2, seed=0, n_init=4, mode="nfds")
    others = [select_calibration(x, flags, 3, 2, seed=s, n_init=4, mode="nfds") for s in (1, 2, 3)]
    assert any(o != a for o in others)
    assert len(a) == len(set(a)) <= 6
    bad = set(np.flatnonzero(flags).tolist())
    for seed in range(5):
        assert not bad & set(select_calibration(x, flags, 3, 2, seed=seed, n_init=4, mode="filter"))
    # random ignores the filter: over seeds it does reach flagged samples.
    hits = set().union(*(select_calibration(x, flags, 3, 2, seed=s, n_init=4, mode="random") for s in range(20)))
    assert hits & bad
    clusters = select_calibration_detailed(x, flags, 3, 2, seed=0, n_init=4, mode="cluster").clusters
    assert clusters is not None and sorted(clusters) == list(range(len(x)))  # cluster mode uses the whole pool
    clusters = select_calibration_detailed(x, flags, 3, 2, seed=0, n_init=4, mode="nfds").clusters
    assert clusters is not None and not bad & set(clusters) and set(clusters.values()) == {0, 1, 2}


def test_selection_independent_of_torch_threads(tiny: nn.Module, pool: list[EvalSample]) -> None:
    old = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            f = pool_features(tiny, pool[:8])
            runs.append(select_calibration(f.frame, iqr_outliers(f.deep), 3, 1, seed=0, n_init=4))
    finally:
        torch.set_num_threads(old)
    assert runs[0] == runs[1]


def test_pool_smaller_than_clusters_is_a_clear_error() -> None:
    x = np.arange(10.0).reshape(5, 2)
    with pytest.raises(ValueError, match=r"calibration pool of 3 samples is smaller than n_clusters=5: lower"):
        select_calibration(x, np.array([1, 1, 0, 0, 0], bool), 5, 1, seed=0, n_init=2, mode="nfds")
    with pytest.raises(ValueError, match="mode must be one of"):
        select_calibration(x, None, 2, 1, seed=0, mode="kmeans")  # type: ignore[arg-type]
