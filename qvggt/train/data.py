"""A rendered training set, cached on disk so rendering never dominates the step time.

The cache is a folder of ``.npy`` arrays (memory-mapped on read), one row per scene, in VGGT's normalised
coordinates: ``images`` uint8 [N, S, 3, H, W], ``depth`` float16 [N, S, H, W], ``world_points`` float16
[N, S, H, W, 3], ``valid_mask`` bool [N, S, H, W], ``extrinsics``/``intrinsics`` float32 [N, S, 3, 4]/[N, S, 3, 3],
plus ``meta.json`` (seeds, categories, sizes). Its folder name is a hash of what it holds; it is built in a temp
folder and renamed into place, so an interrupted build is never mistaken for a finished one.

A cache may hold longer trajectories than a training sample uses: :func:`frame_windows` picks ``S`` frames per
scene (a stride sets the baseline between them) and :func:`select_frames` re-expresses them in VGGT's normalised
frame of the first picked frame, exactly as rendering only those frames and normalising would.
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
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            # Another process finished the same cache first (same key, same content): use its copy.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def frame_windows(rng: np.random.Generator, batch_size: int, num_frames: int, rendered: int, stride: int) -> np.ndarray:
    """Frame indices [B, S] of ``batch_size`` windows: ``num_frames`` frames ``stride`` apart, each window at a
    random start within the ``rendered`` frames; the frames keep the trajectory's order."""
    span = (num_frames - 1) * stride
    if stride < 1 or span >= rendered:
        raise ValueError(f"{num_frames} frames {stride} apart do not fit in {rendered} rendered frames")
    starts = rng.integers(0, rendered - span, batch_size)
    return starts[:, None] + stride * np.arange(num_frames)[None]


def select_frames(batch: dict[str, torch.Tensor], frames: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
    """The frames ``frames`` [B, S'] of each scene of a normalised ``batch`` (as :meth:`SceneCache.batch` gives),
    re-normalised as VGGT's targets are: the first picked camera becomes ``[I | 0]`` and depth, points and
    translations are scaled so that the mean distance of the picked frames' valid points to it is 1."""
    idx = torch.as_tensor(np.asarray(frames), dtype=torch.long)
    rows = torch.arange(idx.shape[0])[:, None]
    ext = batch["extrinsics"][rows, idx].double()  # [B, S', 3, 4]
    mask = batch["valid_mask"][rows, idx]
    r0, t0 = ext[:, 0, :, :3], ext[:, 0, :, 3]
    pts = torch.einsum("bij,bshwj->bshwi", r0, batch["world_points"][rows, idx].double()) + t0[:, None, None, None]
    dist = (pts.norm(dim=-1) * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)
    scale = torch.where(dist > 0, 1.0 / dist, torch.ones_like(dist))  # as SyntheticScene.normalized()
    rel = ext[..., :3] @ r0.transpose(-1, -2)[:, None]  # R_i R_0^T
    trans = (ext[..., 3] - torch.einsum("bsij,bj->bsi", rel, t0)) * scale[:, None, None]
    new_ext = torch.cat([rel, trans[..., None]], -1)
    new_ext[:, 0] = torch.eye(3, 4, dtype=new_ext.dtype)  # exactly the identity, as normalized() writes it
    out = dict(batch)
    out.update(
        images=batch["images"][rows, idx],
        depth=(batch["depth"][rows, idx] * scale[:, None, None, None]).float(),
        world_points=torch.where(mask[..., None], pts * scale[:, None, None, None, None], 0.0).float(),
        valid_mask=mask,
        extrinsics=new_ext.float(),
        intrinsics=batch["intrinsics"][rows, idx],
    )
    return out


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
