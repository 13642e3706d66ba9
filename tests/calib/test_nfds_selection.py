"""NFDS frame feature and selection: the paper's per-token cosine, no histogram bin edges, feature blocks that weigh
the same whatever their width, and short clusters topped up so the set has the requested size (recorded in the
manifest)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import torch

from qvggt.calib.command import write_selection
from qvggt.calib.manifest import CalibrationManifest
from qvggt.calib.nfds import QUANTILES, frame_cosines, frame_feature, select_calibration, select_calibration_detailed

PS = 2  # special tokens per frame in the synthetic outputs below


def _output_with_cosines(cos: np.ndarray, n_tokens: int = 16, dim: int = 12, seed: int = 0) -> torch.Tensor:
    """[S, PS + n_tokens, dim] output whose patch token p of frame s has cosine ``cos[s-1, p]`` to frame 0's."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n_tokens, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = rng.normal(size=(n_tokens, dim))
    v -= (v * u).sum(1, keepdims=True) * u  # v orthogonal to u, token by token
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    scale = rng.uniform(0.5, 3.0, size=(cos.shape[0], n_tokens, 1))  # cosines ignore token norms
    frames = [u] + [(c[:, None] * u + np.sqrt(1 - c[:, None] ** 2) * v) * k for c, k in zip(cos, scale, strict=True)]
    special = rng.normal(size=(len(frames), PS, dim))
    return torch.from_numpy(np.concatenate([special, np.stack(frames)], axis=1))


def test_frame_feature_is_quantiles_of_mean_per_token_cosines() -> None:
    rng = np.random.default_rng(1)
    cos = rng.uniform(-0.2, 0.95, size=(4, 16))  # S = 5: frames 1..4, 16 patch tokens each
    last = _output_with_cosines(cos)
    np.testing.assert_allclose(frame_cosines(last, PS), cos.mean(1), atol=1e-12)
    feat = frame_feature(last, PS)
    np.testing.assert_allclose(feat, np.quantile(cos.mean(1), QUANTILES), atol=1e-12)
    # Not the cosine of the per-frame mean embeddings (the former definition).
    patches = last[:, PS:]
    emb = patches.mean(1)
    of_means = torch.nn.functional.cosine_similarity(emb[1:], emb[:1].expand_as(emb[1:]), dim=-1).numpy()
    assert np.abs(np.sort(of_means) - np.sort(cos.mean(1))).max() > 0.05
    # Order-free in frames 1..S-1.
    np.testing.assert_allclose(frame_feature(last[[0, 3, 1, 4, 2]], PS), feat, atol=1e-12)


def test_frame_feature_is_continuous_across_former_bin_edges() -> None:
    grid = np.round(np.arange(-0.949, 0.95, 0.002), 6)  # holds 0.749 and 0.751
    feats = np.stack([frame_feature(_output_with_cosines(np.full((2, 16), c)), PS) for c in grid])
    # A step of 0.002 in every cosine moves every component by 0.002 (up to rounding): no jump at 0.75 or anywhere.
    assert np.abs(np.diff(feats, axis=0)).max() < 0.0021
    at = {float(c): f for c, f in zip(grid, feats, strict=True)}
    assert np.abs(at[0.751] - at[0.749]).max() < 0.0021


def test_blocks_weigh_the_same_whatever_their_width() -> None:
    rng = np.random.default_rng(3)
    frame, deep = rng.normal(size=(30, 5)), rng.normal(size=(30, 16))
    for seed in range(3):
        base = select_calibration_detailed((frame, deep), None, 4, 2, seed, n_init=4, mode="cluster")
        wide = select_calibration_detailed((frame, np.tile(deep, 4)), None, 4, 2, seed, n_init=4, mode="cluster")
        shifted = select_calibration_detailed((frame * 100 + 7, deep), None, 4, 2, seed, n_init=4, mode="cluster")
        assert wide.chosen == base.chosen == shifted.chosen and wide.clusters == base.clusters
    # Concatenated into one block, the widened deep statistics would outvote the frame feature.
    one = select_calibration_detailed(np.hstack([frame, deep]), None, 4, 2, 0, n_init=4, mode="cluster")
    one_wide = select_calibration_detailed(
        np.hstack([frame, np.tile(deep, 4)]), None, 4, 2, 0, n_init=4, mode="cluster"
    )
    assert one.clusters != one_wide.clusters


def _three_groups() -> np.ndarray:
    """1-D features: one isolated sample, then groups of 5 and 6 -> k-means with k = 3 finds clusters 1, 5, 6."""
    rng = np.random.default_rng(0)
    return np.r_[[0.0], 10 + 0.1 * rng.random(5), 20 + 0.1 * rng.random(6)][:, None]


def test_short_clusters_are_topped_up_to_the_requested_size() -> None:
    x = _three_groups()
    for mode in ("cluster", "nfds"):
        sel = select_calibration_detailed(x, None, 3, 2, seed=0, n_init=4, mode=mode)
        sizes = collections.Counter(sel.clusters.values())
        assert sorted(sizes.values()) == [1, 5, 6]
        assert len(sel.chosen) == len(set(sel.chosen)) == 6 and sel.topped_up == 1 and sel.short_by == 0
        assert 0 in sel.chosen  # the lone sample is still drawn
        per = collections.Counter(sel.clusters[i] for i in sel.chosen)
        assert sorted(per.values()) == [1, 2, 3]  # the spare place went to one other cluster
        assert sel.chosen == select_calibration(x, None, 3, 2, seed=0, n_init=4, mode=mode)  # deterministic
    # More places than the clean pool holds: every survivor, and the shortfall is reported.
    mask = np.zeros(12, dtype=bool)
    mask[6:] = True
    sel = select_calibration_detailed(x, mask, 2, 4, seed=0, n_init=4, mode="nfds")
    assert sel.chosen == list(range(6)) and sel.requested == 8 and sel.short_by == 2


def _write_inputs(tmp: Path, x: np.ndarray, removed: list[str]) -> tuple[Path, Path, Path]:
    ids = [f"synthetic/scene_{i:03d}" for i in range(len(x))]
    pool = {"kind": "pool", "dataset": "synthetic:calib", "frames": 2, "image_hw": [42, 42],
            "samples": [{"sample_id": s, "category": "c", "frame_ids": ["0", "1"], "sha256": "ab" * 32} for s in ids]}  # fmt: skip
    (tmp / "pool.json").write_text(json.dumps(pool))
    np.savez(
        tmp / "features.npz", deep=np.zeros((len(x), 4)), frame=x, sample_ids=np.asarray(ids),
        categories=np.asarray(["c"] * len(x)), deep_names=np.asarray(["a", "b", "c", "d"]),
        layers=np.asarray([0], dtype=np.int64), model_sha256=np.asarray("cd" * 32),
    )  # fmt: skip
    doc = {"kind": "outliers", "iqr_factor": 1.5, "per_category": True, "removed_ids": removed}
    (tmp / "outliers.json").write_text(json.dumps(doc))
    return tmp / "pool.json", tmp / "features.npz", tmp / "outliers.json"


def test_manifest_records_top_ups_and_shortfalls_and_old_manifests_still_load(tmp_path: Path) -> None:
    x = _three_groups()
    result = write_selection(*_write_inputs(tmp_path, x, []), tmp_path / "a", "nfds", 0, 3, 2, 4)
    m = CalibrationManifest.read(result.manifest_path)
    assert len(m.sample_ids) == result.num_selected == 6
    assert m.config["selection"] == {"requested": 6, "short_by": 0, "topped_up": 1}
    summary = json.loads(result.summary_path.read_text())
    assert summary["num_requested"] == 6 and summary["num_topped_up"] == 1
    removed = [f"synthetic/scene_{i:03d}" for i in range(6, 12)]
    short = write_selection(*_write_inputs(tmp_path, x, removed), tmp_path / "b", "nfds", 0, 2, 4, 4)
    # 6 survivors in clusters of 1 and 5: all 6 taken (1 place topped up), 2 short of the 8 requested.
    assert CalibrationManifest.read(short.manifest_path).config["selection"] == {
        "requested": 8, "short_by": 2, "topped_up": 1
    }  # fmt: skip
    # A manifest written before these fields existed loads, and keeps its bytes (its sha256 is its identity).
    old = json.loads(result.manifest_path.read_text())
    for key in ("selection", "cluster_features"):
        del old["config"][key]
    text = json.dumps(old, sort_keys=True, indent=2, ensure_ascii=True) + "\n"
    (tmp_path / "old.json").write_text(text)
    back = CalibrationManifest.read(tmp_path / "old.json")
    assert back.to_json() == text and back.sample_ids == m.sample_ids
