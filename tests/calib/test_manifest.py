"""The calibration manifest: byte-identical JSON for the same inputs and seed (any torch thread count),
atomic write / read round trip, and the checks that keep it machine-independent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qvggt.calib.manifest import CalibrationManifest, build_manifest, images_sha256
from qvggt.eval.datasets import EvalSample, SyntheticEvalDataset
from qvggt.model import build_model, get_preset


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("tiny")).eval()


@pytest.fixture(scope="module")
def pool() -> list[EvalSample]:
    return list(SyntheticEvalDataset.from_config(10, split="calib", num_frames=3, height=42, width=42))


def _build(tiny: nn.Module, pool: list[EvalSample], seed: int = 0) -> CalibrationManifest:
    return build_manifest(
        tiny, pool, "nfds", n_clusters=3, n_per_cluster=2, seed=seed, n_init=4, config={"dataset": "synthetic:calib"}
    )


def test_manifest_byte_identical_across_runs_and_threads(tiny: nn.Module, pool: list[EvalSample], tmp_path: Path):
    old = torch.get_num_threads()
    texts = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            m = _build(tiny, pool)
            texts.append(m.write(tmp_path / f"m{len(texts)}.json").read_bytes())
    finally:
        torch.set_num_threads(old)
    assert texts[0] == texts[1] == texts[2]
    assert b"synthetic/" in texts[0] and str(tmp_path).encode() not in texts[0]
    other = _build(tiny, pool, seed=1)
    assert other.sha256() != m.sha256() or other.sample_ids == m.sample_ids


def test_manifest_contents_and_round_trip(tiny: nn.Module, pool: list[EvalSample], tmp_path: Path) -> None:
    m = _build(tiny, pool)
    by_id = {s.sample_id: s for s in pool}
    assert not set(m.sample_ids) & set(m.removed_ids)
    assert m.cluster_of is not None and set(m.cluster_of) == set(m.pool_ids) - set(m.removed_ids)
    assert m.frame_ids == [list(by_id[i].frame_ids) for i in m.sample_ids]
    assert m.data_hashes == {i: images_sha256(by_id[i].images) for i in m.sample_ids}
    assert m.config["layers"] == [0, 1, 2, 3] and m.config["n_init"] == 4
    back = CalibrationManifest.read(m.write(tmp_path / "sub" / "manifest.json"))
    assert back == m and back.to_json() == m.to_json() and back.sha256() == m.sha256()
    assert not list((tmp_path / "sub").glob(".*.tmp"))  # atomic write leaves no temp file


def test_manifest_rejects_machine_dependent_or_inconsistent_content() -> None:
    base = {"mode": "random", "seed": 0, "sample_ids": ["a"], "frame_ids": [["0"]], "pool_ids": ["a", "b"]}
    with pytest.raises(ValueError, match="absolute path"):
        CalibrationManifest(**base, config={"root": "/data/co3d"})
    with pytest.raises(ValueError, match="outliers were selected"):
        CalibrationManifest(**base, removed_ids=["a"])
    with pytest.raises(ValueError, match="non-finite"):
        CalibrationManifest(**base, config={"x": float("nan")})
    assert images_sha256(np.zeros((1, 3, 2, 2), np.float64)) == images_sha256(np.zeros((1, 3, 2, 2), np.float32))
