"""``qvggt calibrate``: choose a calibration set and write its manifest (the input every calibrated method reads).

The pool is the first ``pool_scenes`` scenes of the calibration split (``data.calib_seeds``, disjoint from the
evaluation split by construction), rendered at the model's own image size. :func:`run_calibrate` runs the chosen
selection mode (:mod:`qvggt.calib.nfds`) and writes, atomically:

- ``manifest.json``: the canonical :class:`~qvggt.calib.manifest.CalibrationManifest` (byte-identical for the same
  model, settings and seed), whose sha256 identifies the calibration set in cache keys and MLflow tags;
- ``calibrate.json``: a small summary (pool size, removed outliers, selected samples, clusters, manifest sha256)
  that DVC tracks as metrics.

The same work is also available as four steps, each reading and writing artifact files (what the Prefect tasks
of ``tasks/calibration.py`` cache), and :func:`run_calibrate` is exactly their composition:

1. :func:`write_pool`: the candidate pool (``pool.json``: sample ids, categories, frame ids, image sha256s);
2. :func:`write_features`: deep-layer statistics and frame-aware features of every candidate (``features.npz``);
3. :func:`write_outliers`: the IQR filter's decision (``outliers.json``);
4. :func:`write_selection`: k-means and the per-cluster draw -> ``manifest.json`` and ``calibrate.json``.

Every setting is checked before the model is loaded, so bad input fails at once and writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qvggt.calib.manifest import CalibrationManifest
from qvggt.calib.nfds import MODES
from qvggt.config import DataConfig
from qvggt.io import atomic_open, sha256_file

__all__ = [
    "FEATURES_NAME",
    "MANIFEST_NAME",
    "OUTLIERS_NAME",
    "POOL_NAME",
    "SUMMARY_NAME",
    "CalibrateResult",
    "check_calibrate_settings",
    "load_pool",
    "manifest_batches",
    "read_manifest_sha256",
    "run_calibrate",
    "write_features",
    "write_outliers",
    "write_pool",
    "write_selection",
]

MANIFEST_NAME = "manifest.json"
SUMMARY_NAME = "calibrate.json"


@dataclass(frozen=True)
class CalibrateResult:
    """Where the manifest went and what it holds."""

    manifest_path: Path
    summary_path: Path
    manifest_sha256: str
    pool_size: int
    num_removed: int
    num_selected: int
    num_requested: int  # n_clusters * n_per_cluster (cluster modes) or the draw size asked for
    num_topped_up: int  # places short clusters could not fill, taken by larger clusters


def check_calibrate_settings(
    mode: str, pool_scenes: int, frames: int, n_clusters: int, n_per_cluster: int, n_init: int, iqr_factor: float
) -> None:
    """ValueError naming the fix for settings that cannot work; nothing is loaded or written."""
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; use one of {', '.join(MODES)}")
    if pool_scenes < 1 or frames < 1:
        raise ValueError(f"pool_scenes and frames must be >= 1, got {pool_scenes} and {frames}")
    if n_clusters < 1 or n_per_cluster < 1 or n_init < 1:
        raise ValueError(
            f"n_clusters, n_per_cluster and n_init must be >= 1, got {n_clusters}, {n_per_cluster}, {n_init}"
        )
    if iqr_factor <= 0:
        raise ValueError(f"iqr_factor must be > 0 (1.5 is Tukey's rule), got {iqr_factor}")
    if mode in ("cluster", "nfds") and pool_scenes < n_clusters:
        # k-means cannot make more clusters than samples; the filter can only make the pool smaller still.
        raise ValueError(
            f"the calibration pool ({pool_scenes} scenes) is smaller than n_clusters={n_clusters}: "
            f"raise calibrate.pool_scenes (--pool-scenes) or lower calibrate.n_clusters (--n-clusters)"
        )


POOL_NAME = "pool.json"
FEATURES_NAME = "features.npz"
OUTLIERS_NAME = "outliers.json"
POOL_DATASET = "synthetic:calib"


def _write_json(path: Path, doc: dict[str, Any]) -> Path:
    with atomic_open(path, "w") as f:
        f.write(json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path


def _read_json(path: str | Path, kind: str) -> dict[str, Any]:
    doc = json.loads(Path(path).read_text())
    if doc.get("kind") != kind:
        raise ValueError(f"{path} is not a calibration {kind} file (kind={doc.get('kind')!r})")
    return doc


def _pool_dataset(n: int, frames: int, image_hw: Sequence[int], data: DataConfig) -> Any:
    """The first ``n`` scenes of the calibration split, ``frames`` views each at ``image_hw``."""
    from qvggt.eval.datasets import SyntheticEvalDataset

    h, w = image_hw
    return SyntheticEvalDataset.from_config(n, "calib", data=data, num_frames=frames, height=h, width=w)


def write_pool(
    out: str | Path, pool_scenes: int, frames: int, image_hw: tuple[int, int], data: DataConfig | None = None
) -> Path:
    """Step 1: render the first ``pool_scenes`` calibration-split scenes (``frames`` views at ``image_hw``) and
    write ``out/pool.json``: settings plus, per sample, id, category, frame ids and the sha256 of its images."""
    from qvggt.calib.manifest import images_sha256

    data = data or DataConfig()
    if not 1 <= pool_scenes <= len(data.calib_seeds.seeds()):
        raise ValueError(
            f"pool_scenes={pool_scenes} must be in [1, {len(data.calib_seeds.seeds())}] (the seeds in data.calib_seeds)"
        )
    doc: dict[str, Any] = {"kind": "pool", "dataset": POOL_DATASET, "frames": frames, "image_hw": list(image_hw)}
    doc["samples"] = [
        {"sample_id": s.sample_id, "category": s.category, "frame_ids": list(s.frame_ids),
         "sha256": images_sha256(s.images)}
        for s in _pool_dataset(pool_scenes, frames, image_hw, data)
    ]  # fmt: skip
    return _write_json(Path(out) / POOL_NAME, doc)


def load_pool(pool_path: str | Path, data: DataConfig | None = None) -> list[Any]:
    """The samples of a ``pool.json``, rendered again and checked against their recorded sha256 (a changed
    renderer or data split is an error, not a silently different calibration set)."""
    from qvggt.calib.manifest import images_sha256

    pool = _read_json(pool_path, "pool")
    samples = list(_pool_dataset(len(pool["samples"]), pool["frames"], pool["image_hw"], data or DataConfig()))
    for sample, rec in zip(samples, pool["samples"], strict=True):
        if sample.sample_id != rec["sample_id"] or images_sha256(sample.images) != rec["sha256"]:
            raise ValueError(
                f"{pool_path}: sample {rec['sample_id']} no longer renders the same images (data settings or the "
                "renderer changed): rebuild the pool (rerun the calibration)"
            )
    return samples


def write_features(
    checkpoint: str | Path, pool_path: str | Path, out: str | Path, data: DataConfig | None = None
) -> Path:
    """Step 2: one aggregator pass per pool sample -> ``out/features.npz`` (``deep`` float64 [N, D], ``frame``
    float64 [N, F], ``sample_ids`` / ``categories`` [N], ``deep_names`` [D], ``layers``)."""
    import numpy as np

    from qvggt.calib.nfds import pool_features
    from qvggt.model import load_vggt

    samples = load_pool(pool_path, data)
    model = load_vggt(checkpoint).eval()
    h, w = _read_json(pool_path, "pool")["image_hw"]
    if tuple(model.cfg.default_image_hw) != (h, w):
        raise ValueError(f"{pool_path} was rendered at {h}x{w} but {checkpoint} expects {model.cfg.default_image_hw}")
    with torch.no_grad():
        feats = pool_features(model, samples)
    path = Path(out) / FEATURES_NAME
    with atomic_open(path, "wb") as f:
        np.savez(
            f, deep=feats.deep, frame=feats.frame, sample_ids=np.asarray(feats.sample_ids),
            categories=np.asarray(feats.categories), deep_names=np.asarray(feats.deep_names),
            layers=np.asarray(feats.layers, dtype=np.int64), model_sha256=np.asarray(sha256_file(checkpoint)),
        )  # fmt: skip
    return path


def _read_features(path: str | Path) -> dict[str, Any]:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return {
            "deep": z["deep"], "frame": z["frame"], "sample_ids": [str(s) for s in z["sample_ids"]],
            "categories": [str(c) for c in z["categories"]], "layers": [int(i) for i in z["layers"]],
            "model_sha256": str(z["model_sha256"]),
        }  # fmt: skip


def write_outliers(
    features_path: str | Path, out: str | Path, iqr_factor: float = 1.5, per_category: bool = True
) -> Path:
    """Step 3: Tukey's IQR rule on the deep-layer statistics -> ``out/outliers.json`` (flagged sample ids)."""
    from qvggt.calib.nfds import iqr_outliers

    feats = _read_features(features_path)
    flags = iqr_outliers(feats["deep"], feats["categories"] if per_category else None, iqr_factor)
    removed = [sid for sid, flag in zip(feats["sample_ids"], flags.tolist(), strict=True) if flag]
    doc = {"kind": "outliers", "iqr_factor": iqr_factor, "per_category": per_category, "removed_ids": removed}
    return _write_json(Path(out) / OUTLIERS_NAME, doc)


def write_selection(
    pool_path: str | Path,
    features_path: str | Path,
    outliers_path: str | Path,
    out: str | Path,
    mode: str = "nfds",
    seed: int = 0,
    n_clusters: int = 4,
    n_per_cluster: int = 2,
    n_init: int = 10,
) -> CalibrateResult:
    """Step 4: k-means on the frame-aware and deep-layer features, two equally weighted blocks (of the filter's
    survivors in ``filter`` / ``nfds`` modes), and a seeded per-cluster draw topped up where clusters are small -> ``out/manifest.json`` (same bytes as :func:`~qvggt.calib.manifest.build_manifest`
    on the same inputs) and ``out/calibrate.json``."""
    import numpy as np

    from qvggt.calib.manifest import CLUSTER_FEATURES, selection_record
    from qvggt.calib.nfds import select_calibration_detailed

    pool = _read_json(pool_path, "pool")
    feats = _read_features(features_path)
    outliers = _read_json(outliers_path, "outliers")
    ids = feats["sample_ids"]
    if ids != [s["sample_id"] for s in pool["samples"]]:
        raise ValueError(f"{features_path} was not computed on {pool_path}: rerun the feature step")
    removed = set(outliers["removed_ids"])
    mask = np.asarray([sid in removed for sid in ids], dtype=bool)
    sel = select_calibration_detailed(
        (feats["frame"], feats["deep"]),
        mask,
        n_clusters,
        n_per_cluster,
        seed,
        n_init,
        mode,  # type: ignore[arg-type]
    )
    chosen, clusters = sel.chosen, sel.clusters
    h, w = pool["image_hw"]
    config = {
        "n_clusters": n_clusters, "n_per_cluster": n_per_cluster, "n_init": n_init, "layers": feats["layers"],
        "iqr_factor": outliers["iqr_factor"], "per_category": outliers["per_category"],
        "cluster_features": list(CLUSTER_FEATURES), "selection": selection_record(sel),
        # Settings and content hashes only: no absolute paths or timestamps (the file must be byte-identical).
        "dataset": pool["dataset"], "pool_scenes": len(ids), "frames": pool["frames"], "image_hw": [h, w],
        "model_sha256": feats["model_sha256"],
    }  # fmt: skip
    manifest = CalibrationManifest(
        mode=mode,
        seed=seed,
        sample_ids=[ids[i] for i in chosen],
        frame_ids=[list(pool["samples"][i]["frame_ids"]) for i in chosen],
        pool_ids=list(ids),
        removed_ids=[sid for sid in ids if sid in removed] if mode in ("filter", "nfds") else [],
        cluster_of=None if clusters is None else {ids[i]: c for i, c in sorted(clusters.items())},
        config=config,
        data_hashes={ids[i]: pool["samples"][i]["sha256"] for i in chosen},
    )
    out = Path(out)
    manifest_path = manifest.write(out / MANIFEST_NAME)
    summary = {
        "mode": mode, "seed": seed, "pool_size": len(ids), "num_removed": len(manifest.removed_ids),
        "num_selected": len(manifest.sample_ids), "num_requested": sel.requested, "num_topped_up": sel.topped_up,
        "num_clusters": len(set((manifest.cluster_of or {}).values())),
        "manifest_sha256": manifest.sha256(),
    }  # fmt: skip
    summary_path = _write_json(out / SUMMARY_NAME, summary)
    return CalibrateResult(
        manifest_path, summary_path, summary["manifest_sha256"], len(ids), summary["num_removed"],
        summary["num_selected"], sel.requested, sel.topped_up,
    )  # fmt: skip


def run_calibrate(
    checkpoint: str | Path,
    out: str | Path,
    mode: str = "nfds",
    seed: int = 0,
    pool_scenes: int = 24,
    frames: int = 4,
    n_clusters: int = 4,
    n_per_cluster: int = 2,
    n_init: int = 10,
    iqr_factor: float = 1.5,
    data: DataConfig | None = None,
) -> CalibrateResult:
    """Select a calibration set for ``checkpoint`` from the calibration split: the four steps above, writing
    ``pool.json``, ``features.npz``, ``outliers.json``, ``manifest.json`` and ``calibrate.json`` into ``out``.
    Raises ValueError (bad settings), CheckpointError / FileNotFoundError (bad model)."""
    from qvggt.model import load_vggt

    check_calibrate_settings(mode, pool_scenes, frames, n_clusters, n_per_cluster, n_init, iqr_factor)
    data = data or DataConfig()
    if pool_scenes > len(data.calib_seeds.seeds()):
        raise ValueError(
            f"pool_scenes={pool_scenes} exceeds the calibration split ({len(data.calib_seeds.seeds())} seeds in "
            "data.calib_seeds)"
        )
    torch.manual_seed(seed)
    hw = load_vggt(checkpoint).cfg.default_image_hw  # fails here, before rendering, on a bad checkpoint
    pool = write_pool(out, pool_scenes, frames, hw, data)
    features = write_features(checkpoint, pool, out, data)
    outliers = write_outliers(features, out, iqr_factor)
    return write_selection(pool, features, outliers, out, mode, seed, n_clusters, n_per_cluster, n_init)


def manifest_batches(manifest_path: str | Path, data: DataConfig | None = None) -> tuple[list[torch.Tensor], list[str]]:
    """The calibration batches a manifest names (one ``[1, S, 3, H, W]`` batch per selected sample, in selection
    order) and their ids, rendered again and checked against the manifest's ``data_hashes``."""
    from qvggt.calib.manifest import images_sha256

    manifest = CalibrationManifest.read(manifest_path)
    cfg = manifest.config
    if cfg.get("dataset") != POOL_DATASET:
        raise ValueError(
            f"{manifest_path}: only {POOL_DATASET} manifests can be rendered here, got {cfg.get('dataset')!r}"
        )
    ds = _pool_dataset(int(cfg["pool_scenes"]), int(cfg["frames"]), cfg["image_hw"], data or DataConfig())
    batches = []
    for sid in manifest.sample_ids:
        sample = ds.load(sid)
        if images_sha256(sample.images) != manifest.data_hashes.get(sid):
            raise ValueError(
                f"{manifest_path}: sample {sid} no longer renders the same images (data settings or the renderer "
                "changed): rerun the calibration"
            )
        batches.append(torch.from_numpy(sample.images)[None])
    return batches, list(manifest.sample_ids)


def read_manifest_sha256(path: str | Path) -> str:
    """sha256 of a written manifest's canonical form (validates the file; ValueError if it is not a manifest)."""
    return CalibrationManifest.read(path).sha256()
