"""Microsoft 7-Scenes RGB-D sequences as evaluation samples with depth and world-point ground truth.

Layout (``<root>`` as published, archives unpacked)::

    <root>/<scene>/seq-XX/frame-NNNNNN.color.png   RGB, 640x480
    <root>/<scene>/seq-XX/frame-NNNNNN.depth.png   uint16 millimetres; 0 and 65535 are invalid
    <root>/<scene>/seq-XX/frame-NNNNNN.pose.txt    4x4 camera-to-world (metres)
    <root>/<scene>/TestSplit.txt, TrainSplit.txt   lines "sequenceN" -> seq-0N (needed for split test/train)

Camera: the published Kinect defaults ``fx = fy = 585``, ``(cx, cy) = (320, 240)`` at 640x480, taken with the
origin at the top-left pixel centre (the usual reading of these nominal values); all parameters of the
constructor. Caveat: 7-Scenes depth is NOT registered to the RGB camera (the two Kinect sensors are offset and
uncalibrated in the release); like most evaluations we treat the depth map as if seen by the RGB camera with the
same intrinsics, so GT and image disagree by a few pixels near depth edges.

Per sequence one sample of ``num_frames`` frames: indices ``start, start + stride, ...`` into the sorted frames
(``stride=None`` spreads them evenly over the whole sequence); sequences too short are skipped.

Preprocessing: images through VGGT's crop mode (:func:`qvggt.data.images.load_images`); depth resized with
centre-aligned nearest neighbour to the same resize size and cropped identically (no invalid/valid mixing);
intrinsics through :func:`.base.preprocessed_intrinsics`. GT ``world_points`` unproject the PREPROCESSED depth
with the preprocessed intrinsics and the pose (``X = R_c2w depth K^-1 [u, v, 1] + t_c2w``), so they reproject
exactly onto their pixels; ``extrinsics`` = inverse pose (camera-from-world, OpenCV axes as 7-Scenes uses).

Legend for shapes: S = ``num_frames``; H x W the preprocessed size (518 x 392 for 640x480 at target 518).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qvggt.data.images import DEFAULT_TARGET_SIZE, check_target_size, load_images, preprocess_geometry
from qvggt.eval.datasets.base import EvalDataset, EvalSample, preprocessed_intrinsics

__all__ = ["KINECT_INTRINSICS", "SevenScenesDataset", "resize_depth_nearest"]

#: (fx, fy, cx, cy) at 640x480: the nominal Kinect values published with 7-Scenes.
KINECT_INTRINSICS: tuple[float, float, float, float] = (585.0, 585.0, 320.0, 240.0)
_INVALID_DEPTH = 65535


def resize_depth_nearest(depth: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    """Nearest-neighbour resize of ``depth`` [H, W] to [new_h, new_w], centre-aligned like PIL's resize (output
    pixel ``u`` reads source pixel ``floor((u + 0.5) W / new_w)``), so it matches the image geometry."""
    h, w = depth.shape
    rows = np.minimum(((np.arange(new_h) + 0.5) * h / new_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * w / new_w).astype(np.int64), w - 1)
    return depth[rows[:, None], cols[None, :]]


@dataclass(frozen=True)
class _Selected:
    scene: str
    sequence: str
    frames: tuple[str, ...]  # file stems "frame-NNNNNN"


class SevenScenesDataset(EvalDataset):
    """7-Scenes samples with depth, valid mask and world points (see the module docstring).

    Args:
        root: 7-Scenes root directory.
        scenes: scene folder names; ``None`` = every folder holding ``seq-*`` folders.
        split: ``"test"`` / ``"train"`` (sequences of ``TestSplit.txt`` / ``TrainSplit.txt``) or ``"all"``.
        num_frames: frames per sample (S).
        stride: frame-index step; ``None`` spreads ``num_frames`` evenly over each sequence.
        start: first frame index (with ``stride``).
        target_size: crop-mode preprocessing width (multiple of 14).
        intrinsics: ``(fx, fy, cx, cy)`` of the colour/depth images at ``image_size``.
        image_size: ``(W, H)`` the intrinsics belong to; frames of another size raise ``ValueError``.
        depth_scale: depth PNG units per metre (1000: millimetres).

    ``sample_id`` = ``7scenes/<scene>/<seq-XX>/frames-<i1>-<i2>-...`` (frame numbers); ``frame_ids`` the file
    stems ``frame-NNNNNN``. Depth in metres, 0 = invalid (PNG value 0 or 65535).
    """

    name = "7scenes"

    def __init__(
        self,
        root: str | Path,
        scenes: Sequence[str] | None = None,
        split: str = "test",
        num_frames: int = 10,
        stride: int | None = 20,
        start: int = 0,
        target_size: int = DEFAULT_TARGET_SIZE,
        intrinsics: Sequence[float] = KINECT_INTRINSICS,
        image_size: tuple[int, int] = (640, 480),
        depth_scale: float = 1000.0,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"7-Scenes root not found or not a directory: {self.root}")
        if split not in ("test", "train", "all"):
            raise ValueError(f"split must be 'test', 'train' or 'all', got {split!r}")
        if num_frames < 1 or (stride is not None and stride < 1) or start < 0:
            raise ValueError(
                f"need num_frames >= 1, stride >= 1 or None, start >= 0; got {num_frames}, {stride}, {start}"
            )
        self.split, self.num_frames, self.stride, self.start = split, int(num_frames), stride, int(start)
        self.target_size = check_target_size(target_size)
        fx, fy, cx, cy = (float(v) for v in intrinsics)
        self.intrinsics = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.depth_scale = float(depth_scale)
        if scenes is None:
            scenes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.glob("seq-*")))
            if not scenes:
                raise FileNotFoundError(f"no 7-Scenes scene folders under {self.root}: expected <root>/<scene>/seq-XX/")
        self.scenes = list(scenes)

        self._samples: dict[str, _Selected] = {}
        num_seqs, short = 0, 0
        for scene in self.scenes:
            for seq in self._sequences(scene):
                num_seqs += 1
                stems = sorted(
                    p.name[: -len(".color.png")] for p in (self.root / scene / seq).glob("frame-*.color.png")
                )
                idx = self._frame_indices(len(stems))
                if idx is None:
                    short += 1
                    continue
                chosen = tuple(stems[i] for i in idx)
                sid = f"7scenes/{scene}/{seq}/frames-" + "-".join(str(int(s.split("-")[1])) for s in chosen)
                self._samples[sid] = _Selected(scene, seq, chosen)
        if not self._samples:
            need = "num_frames" if stride is None else f"start + (num_frames - 1) * stride + 1 = {self._needed()}"
            raise ValueError(
                f"7-Scenes selection is empty for scenes {self.scenes} (split={split!r}): {num_seqs} sequences found, "
                f"{short} of them have fewer frames than {need}. Lower num_frames/stride or check the layout."
            )

    def _needed(self) -> int:
        return self.num_frames if self.stride is None else self.start + (self.num_frames - 1) * self.stride + 1

    def _frame_indices(self, n: int) -> list[int] | None:
        if n < self._needed():
            return None
        if self.stride is None:
            return [round(x) for x in np.linspace(0, n - 1, self.num_frames)]
        return [self.start + k * self.stride for k in range(self.num_frames)]

    def _sequences(self, scene: str) -> list[str]:
        scene_dir = self.root / scene
        if not scene_dir.is_dir():
            raise FileNotFoundError(f"7-Scenes scene folder not found: {scene_dir}")
        found = sorted(p.name for p in scene_dir.glob("seq-*") if p.is_dir())
        if self.split == "all":
            return found
        split_file = scene_dir / ("TestSplit.txt" if self.split == "test" else "TrainSplit.txt")
        if not split_file.is_file():
            raise FileNotFoundError(f"7-Scenes split file missing: {split_file} (or pass split='all')")
        wanted = []
        for line in split_file.read_text().split():
            num = line.strip().lower().removeprefix("sequence")
            if not num.isdigit():
                raise ValueError(f"{split_file}: cannot parse line {line!r} (expected 'sequenceN')")
            wanted.append(f"seq-{int(num):02d}")
        missing = [s for s in wanted if s not in found]
        if missing:
            raise FileNotFoundError(f"{split_file} lists {missing} but they are not in {scene_dir}")
        return wanted

    def sample_ids(self) -> list[str]:
        return list(self._samples)

    def settings(self) -> dict[str, object]:
        # Frame numbers are in the ids; the size, camera and depth scaling are not.
        return {
            "num_frames": self.num_frames, "target_size": self.target_size, "split": self.split,
            "intrinsics": self.intrinsics.tolist(), "image_size": list(self.image_size), "depth_scale": self.depth_scale,
        }  # fmt: skip

    def load(self, sample_id: str) -> EvalSample:
        sel = self._samples.get(sample_id)
        if sel is None:
            raise self._unknown(sample_id)
        seq_dir = self.root / sel.scene / sel.sequence
        w, h = self.image_size
        new_w, new_h, x0, y0 = preprocess_geometry(w, h, "crop", self.target_size)
        k, (out_h, out_w) = preprocessed_intrinsics(self.intrinsics, w, h, self.target_size, "crop")
        colors = [seq_dir / f"{stem}.color.png" for stem in sel.frames]
        for path in colors:
            with Image.open(path) as img:  # header only
                if img.size != (w, h):
                    raise ValueError(f"{path} is {img.size[0]}x{img.size[1]}, expected image_size={w}x{h}")
        images = load_images(colors, mode="crop", target_size=self.target_size).numpy()

        # Pixel rays of the preprocessed image, float64 [H, W, 3] with z = 1.
        u, v = np.meshgrid(np.arange(out_w, dtype=np.float64), np.arange(out_h, dtype=np.float64))
        rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(k).T
        depths, points, extrinsics = [], [], []
        for stem in sel.frames:
            raw = np.asarray(Image.open(seq_dir / f"{stem}.depth.png"), dtype=np.int64)
            if raw.shape != (h, w):
                raise ValueError(f"{seq_dir / f'{stem}.depth.png'} is {raw.shape[1]}x{raw.shape[0]}, expected {w}x{h}")
            d = np.where((raw == 0) | (raw == _INVALID_DEPTH), 0.0, raw / self.depth_scale)
            d = resize_depth_nearest(d, new_w, new_h)[y0 : y0 + out_h, x0 : x0 + out_w]
            pose = np.loadtxt(seq_dir / f"{stem}.pose.txt", dtype=np.float64).reshape(4, 4)
            if not np.all(np.isfinite(pose)):
                raise ValueError(f"{seq_dir / f'{stem}.pose.txt'} holds a non-finite pose")
            pts = (rays * d[..., None]) @ pose[:3, :3].T + pose[:3, 3]
            depths.append(d)
            points.append(np.where(d[..., None] > 0, pts, 0.0))
            extrinsics.append(np.linalg.inv(pose)[:3])  # exact inverse, so points reproject exactly
        depth = np.stack(depths).astype(np.float32)
        return EvalSample(
            sample_id=sample_id,
            category=sel.scene,
            images=images.astype(np.float32, copy=False),
            extrinsics=np.stack(extrinsics).astype(np.float32),
            intrinsics=np.broadcast_to(k, (len(sel.frames), 3, 3)).astype(np.float32),
            depth=depth,
            valid_mask=depth > 0,
            world_points=np.stack(points).astype(np.float32),
            frame_ids=sel.frames,
        )
