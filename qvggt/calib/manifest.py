"""The calibration manifest: which samples (and frames) a calibration run used, why, and their content hashes.

``to_json()`` is canonical: sorted keys, 2-space indent, ASCII, no NaN, a trailing newline, no timestamps and no
absolute paths (a config string that is an absolute path is rejected), so the same inputs and seed give a
byte-identical file and :meth:`CalibrationManifest.sha256` identifies the calibration set.

Fields (N_sel selected samples):

- ``mode``: ``random`` / ``filter`` / ``cluster`` / ``nfds`` (see :mod:`qvggt.calib.nfds`); ``seed``: int.
- ``sample_ids`` [N_sel] selected ids, in selection order; ``frame_ids`` [N_sel][S_i] their frames.
- ``pool_ids``: every candidate, in pool order; ``removed_ids``: the outliers the filter dropped (empty in the
  ``random`` / ``cluster`` modes).
- ``cluster_of``: ``{sample_id: cluster}`` for every clustered sample, or None.
- ``config``: JSON-able settings (n_clusters, n_per_cluster, n_init, layers, dataset spec ...). Manifests written
  since the frame-feature fix also hold ``cluster_features`` (the feature blocks k-means saw, ``["frame", "deep"]``)
  and ``selection`` (:func:`selection_record`: ``requested`` size, ``short_by`` = how many it lacks because the
  clean pool was too small, ``topped_up`` = places small clusters left to others); older manifests lack both and
  still load unchanged (the format version is the same).
- ``data_hashes``: ``{sample_id: sha256 hex}`` of each selected sample's images, see :func:`images_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from qvggt.calib.nfds import Mode, Selection, iqr_outliers, pool_features, select_calibration_detailed
from qvggt.io import atomic_open

__all__ = ["FORMAT", "FORMAT_VERSION", "CalibrationManifest", "build_manifest", "images_sha256", "selection_record"]

FORMAT = "qvggt-calibration-manifest"
FORMAT_VERSION = 1


def images_sha256(images: np.ndarray) -> str:
    """sha256 hex of ``images`` as C-contiguous little-endian float32 bytes (shape is not hashed: the
    manifest's ``frame_ids`` fix S and the config fixes H, W)."""
    arr = np.ascontiguousarray(np.asarray(images), dtype="<f4")
    return hashlib.sha256(arr.tobytes()).hexdigest()


def selection_record(sel: Selection) -> dict[str, Any]:
    """The manifest's ``config["selection"]``: requested size, how many it is short by, how many were topped up."""
    return {"requested": int(sel.requested), "short_by": int(sel.short_by), "topped_up": int(sel.topped_up)}


# What k-means clusters on in the clustered modes (recorded: older manifests clustered other features).
CLUSTER_FEATURES = ["frame", "deep"]


def _check_json_value(value: Any, where: str) -> None:
    """Reject what would make the file machine- or run-dependent: absolute paths, non-finite floats."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            _check_json_value(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_json_value(v, f"{where}[{i}]")
    elif isinstance(value, str):
        if os.path.isabs(value):
            raise ValueError(f"{where}: absolute path {value!r} would make the manifest machine-dependent")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: non-finite float {value}")
    elif value is not None and not isinstance(value, bool | int):
        raise TypeError(f"{where}: {type(value).__name__} is not JSON-able")


@dataclass(frozen=True)
class CalibrationManifest:
    """See the module docstring for the fields."""

    mode: str
    seed: int
    sample_ids: list[str]
    frame_ids: list[list[str]]
    pool_ids: list[str]
    removed_ids: list[str] = field(default_factory=list)
    cluster_of: dict[str, int] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data_hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.frame_ids) != len(self.sample_ids):
            raise ValueError(f"{len(self.frame_ids)} frame lists for {len(self.sample_ids)} samples")
        pool = set(self.pool_ids)
        if len(pool) != len(self.pool_ids) or len(set(self.sample_ids)) != len(self.sample_ids):
            raise ValueError("pool_ids and sample_ids must be unique")
        stray = [s for s in [*self.sample_ids, *self.removed_ids] if s not in pool]
        if stray:
            raise ValueError(f"ids not in the pool: {stray[:5]}")
        both = sorted(set(self.sample_ids) & set(self.removed_ids))
        if both:
            raise ValueError(f"filtered outliers were selected: {both[:5]}")
        if set(self.data_hashes) - set(self.sample_ids):
            raise ValueError("data_hashes has ids that were not selected")
        _check_json_value(self.to_dict(), "manifest")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "mode": self.mode,
            "seed": int(self.seed),
            "sample_ids": list(self.sample_ids),
            "frame_ids": [list(f) for f in self.frame_ids],
            "pool_ids": list(self.pool_ids),
            "removed_ids": list(self.removed_ids),
            "cluster_of": None if self.cluster_of is None else {k: int(v) for k, v in self.cluster_of.items()},
            "config": self.config,
            "data_hashes": dict(self.data_hashes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibrationManifest:
        if d.get("format") != FORMAT or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} v{FORMAT_VERSION} file: format={d.get('format')!r} v={d.get('version')}")
        return cls(
            mode=d["mode"],
            seed=int(d["seed"]),
            sample_ids=list(d["sample_ids"]),
            frame_ids=[list(f) for f in d["frame_ids"]],
            pool_ids=list(d["pool_ids"]),
            removed_ids=list(d["removed_ids"]),
            cluster_of=None if d["cluster_of"] is None else {k: int(v) for k, v in d["cluster_of"].items()},
            config=dict(d["config"]),
            data_hashes=dict(d["data_hashes"]),
        )

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys, indent 2, ASCII, trailing newline)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n"

    def sha256(self) -> str:
        """sha256 hex of :meth:`to_json`'s UTF-8 bytes: the identity of this calibration set."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def write(self, path: str | Path) -> Path:
        """Write :meth:`to_json` atomically (temp file + rename); returns the path."""
        path = Path(path)
        with atomic_open(path, "wb") as f:
            f.write(self.to_json().encode("utf-8"))
        return path

    @classmethod
    def read(cls, path: str | Path) -> CalibrationManifest:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def build_manifest(
    model: nn.Module,
    samples: Sequence[Any],
    mode: Mode = "nfds",
    n_clusters: int = 5,
    n_per_cluster: int = 4,
    seed: int = 0,
    n_init: int = 10,
    layers: Sequence[int] | None = None,
    factor: float = 1.5,
    per_category: bool = True,
    config: dict[str, Any] | None = None,
) -> CalibrationManifest:
    """Run NFDS end to end on a pool of samples (``sample_id``, ``category``, ``images`` [S, 3, H, W],
    ``frame_ids``) and return the manifest; ``config`` adds caller settings (e.g. the dataset spec).

    The filter runs in every mode (so ``removed_ids`` is only reported for ``filter`` / ``nfds``, where it acts).
    """
    feats = pool_features(model, samples, layers)
    outliers = iqr_outliers(feats.deep, feats.categories if per_category else None, factor)
    sel = select_calibration_detailed(feats.blocks, outliers, n_clusters, n_per_cluster, seed, n_init, mode)
    chosen, clusters = sel.chosen, sel.clusters
    ids = feats.sample_ids
    filtered = mode in ("filter", "nfds")
    cfg = {
        "n_clusters": n_clusters,
        "n_per_cluster": n_per_cluster,
        "n_init": n_init,
        "layers": feats.layers,
        "iqr_factor": factor,
        "per_category": per_category,
        "cluster_features": list(CLUSTER_FEATURES),
        "selection": selection_record(sel),
        **(config or {}),
    }
    return CalibrationManifest(
        mode=mode,
        seed=seed,
        sample_ids=[ids[i] for i in chosen],
        frame_ids=[list(samples[i].frame_ids) for i in chosen],
        pool_ids=list(ids),
        removed_ids=[ids[i] for i in np.flatnonzero(outliers)] if filtered else [],
        cluster_of=None if clusters is None else {ids[i]: c for i, c in sorted(clusters.items())},
        config=cfg,
        data_hashes={ids[i]: images_sha256(samples[i].images) for i in chosen},
    )
