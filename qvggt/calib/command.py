"""``qvggt calibrate``: choose a calibration set and write its manifest (the input every calibrated method reads).

The pool is the first ``pool_scenes`` scenes of the calibration split (``data.calib_seeds``, disjoint from the
evaluation split by construction), rendered at the model's own image size. :func:`run_calibrate` runs the chosen
selection mode (:mod:`qvggt.calib.nfds`) and writes, atomically:

- ``manifest.json``: the canonical :class:`~qvggt.calib.manifest.CalibrationManifest` (byte-identical for the same
  model, settings and seed), whose sha256 identifies the calibration set in cache keys and MLflow tags;
- ``calibrate.json``: a small summary (pool size, removed outliers, selected samples, clusters, manifest sha256)
  that DVC tracks as metrics.

Every setting is checked before the model is loaded, so bad input fails at once and writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qvggt.calib.manifest import CalibrationManifest, build_manifest
from qvggt.calib.nfds import MODES
from qvggt.config import DataConfig
from qvggt.io import atomic_open, sha256_file

__all__ = [
    "MANIFEST_NAME",
    "SUMMARY_NAME",
    "CalibrateResult",
    "check_calibrate_settings",
    "read_manifest_sha256",
    "run_calibrate",
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
    """Select a calibration set for ``checkpoint`` from the calibration split; write ``out/manifest.json`` and
    ``out/calibrate.json``. Raises ValueError (bad settings), CheckpointError / FileNotFoundError (bad model)."""
    from qvggt.eval.datasets import SyntheticEvalDataset
    from qvggt.model import load_vggt

    check_calibrate_settings(mode, pool_scenes, frames, n_clusters, n_per_cluster, n_init, iqr_factor)
    data = data or DataConfig()
    calib_range = len(data.calib_seeds.seeds())
    if pool_scenes > calib_range:
        raise ValueError(
            f"pool_scenes={pool_scenes} exceeds the calibration split ({calib_range} seeds in data.calib_seeds)"
        )
    torch.manual_seed(seed)
    model = load_vggt(checkpoint).eval()
    h, w = model.cfg.default_image_hw
    pool = list(SyntheticEvalDataset.from_config(pool_scenes, "calib", data=data, num_frames=frames, height=h, width=w))
    with torch.no_grad():
        manifest = build_manifest(
            model, pool, mode, n_clusters, n_per_cluster, seed, n_init, factor=iqr_factor,
            # Settings and content hashes only: no absolute paths or timestamps (the file must be byte-identical).
            config={"dataset": "synthetic:calib", "pool_scenes": pool_scenes, "frames": frames, "image_hw": [h, w],
                    "model_sha256": sha256_file(checkpoint)},
        )  # fmt: skip
    out = Path(out)
    manifest_path = manifest.write(out / MANIFEST_NAME)
    summary = {
        "mode": mode,
        "seed": seed,
        "pool_size": len(manifest.pool_ids),
        "num_removed": len(manifest.removed_ids),
        "num_selected": len(manifest.sample_ids),
        "num_clusters": len(set((manifest.cluster_of or {}).values())),
        "manifest_sha256": manifest.sha256(),
    }
    summary_path = out / SUMMARY_NAME
    with atomic_open(summary_path, "w") as f:
        f.write(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return CalibrateResult(
        manifest_path, summary_path, manifest.sha256(), summary["pool_size"], summary["num_removed"],
        summary["num_selected"],
    )  # fmt: skip


def read_manifest_sha256(path: str | Path) -> str:
    """sha256 of a written manifest's canonical form (validates the file; ValueError if it is not a manifest)."""
    return CalibrationManifest.read(path).sha256()
