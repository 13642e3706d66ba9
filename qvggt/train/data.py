"""A rendered training set, cached on disk so rendering never dominates the step time.

The cache is a folder of ``.npy`` arrays (memory-mapped on read), one row per scene, in VGGT's normalised
coordinates: ``images`` uint8 [N, S, 3, H, W], ``depth`` float16 [N, S, H, W], ``world_points`` float16
[N, S, H, W, 3], ``valid_mask`` bool [N, S, H, W], ``extrinsics``/``intrinsics`` float32 [N, S, 3, 4]/[N, S, 3, 3],
plus ``meta.json`` (seeds, categories, sizes). Its folder name is a hash of what it holds; it is built in a temp
folder and renamed into place, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qvggt.data.synthetic import make_scene

CACHE_VERSION = 1
FIELDS = ("images", "depth", "world_points", "valid_mask", "extrinsics", "intrinsics")


def cache_key(seeds: list[int], categories: list[str], num_frames: int, size: int) -> str:
    spec = json.dumps([CACHE_VERSION, seeds, categories, num_frames, size])
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def build_cache(
    root: str | Path, seeds: list[int], categories: list[str], num_frames: int, size: int, progress: bool = True
) -> Path:
    """Render scene ``seeds[i]`` of ``categories[i]`` (normalised) into a cache under ``root``; reuse if present."""
    if len(seeds) != len(categories):
        raise ValueError("seeds and categories must have the same length")
    root = Path(root)
    final = root / f"synthetic-{cache_key(seeds, categories, num_frames, size)}"
    if (final / "meta.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    try:
        n, s = len(seeds), num_frames
        shapes = {
            "images": ((n, s, 3, size, size), np.uint8),
            "depth": ((n, s, size, size), np.float16),
            "world_points": ((n, s, size, size, 3), np.float16),
            "valid_mask": ((n, s, size, size), np.bool_),
            "extrinsics": ((n, s, 3, 4), np.float32),
            "intrinsics": ((n, s, 3, 3), np.float32),
        }
        arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", "w+", dt, shp) for k, (shp, dt) in shapes.items()}
        for i in tqdm(range(n), desc="rendering training scenes", disable=not progress, unit="scene"):
            scene = make_scene(seeds[i], num_frames, size, size, category=categories[i]).normalized()
            arrays["images"][i] = np.round(scene.images * 255)
            for k in FIELDS[1:]:
                arrays[k][i] = getattr(scene, k)
        for a in arrays.values():
            a.flush()
        del arrays
        meta = {"version": CACHE_VERSION, "seeds": seeds, "categories": categories, "num_frames": s, "size": size}
        (tmp / "meta.json").write_text(json.dumps(meta))
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class SceneCache:
    """Read side of a cache: ``batch(indices)`` returns torch tensors with a leading batch dim."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "meta.json").is_file():
            raise FileNotFoundError(f"no finished scene cache at {self.path} (build it with build_cache)")
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.arrays = {k: np.load(self.path / f"{k}.npy", mmap_mode="r") for k in FIELDS}

    def __len__(self) -> int:
        return len(self.meta["seeds"])

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices)
        out = {k: torch.from_numpy(np.ascontiguousarray(a[idx])) for k, a in self.arrays.items()}
        out["images"] = out["images"].float() / 255
        out["depth"] = out["depth"].float()
        out["world_points"] = out["world_points"].float()
        return out
