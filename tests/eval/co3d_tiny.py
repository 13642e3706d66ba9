"""A tiny Co3Dv2-format directory written by tests, with the camera conventions spelled out by hand.

Shared by the dataset tests (cameras checked against hand projections) and the paper-table reproduction test.
Imported as a plain module (``tests/eval`` is on ``sys.path`` under pytest's default import mode).
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image


def rot(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def p3d_pixel(xw: np.ndarray, vp: dict, hw: tuple[int, int]) -> np.ndarray:
    """Project world point ``xw`` [3] with a Co3D viewpoint, following PyTorch3D's documentation literally.

    View: row vectors ``X_view = X_world @ R + T`` (+X left, +Y up, +Z forward). NDC: ``x = f X/Z + p``; the
    shorter image side spans [-1, 1] (``ndc_isotropic``) or both sides do (``ndc_norm_image_bounds``); +1 is
    the LEFT / TOP image edge. Result: (column, row) with the origin at the top-left pixel CENTRE."""
    h, w = hw
    xv = xw @ np.asarray(vp["R"]) + np.asarray(vp["T"])
    x_ndc = vp["focal_length"][0] * xv[0] / xv[2] + vp["principal_point"][0]
    y_ndc = vp["focal_length"][1] * xv[1] / xv[2] + vp["principal_point"][1]
    if vp.get("intrinsics_format", "ndc_norm_image_bounds") == "ndc_isotropic":
        half_x = half_y = min(h, w) / 2
    else:
        half_x, half_y = w / 2, h / 2
    x_corner = w / 2 - x_ndc * half_x  # distance from the left edge, in pixels
    y_corner = h / 2 - y_ndc * half_y
    return np.array([x_corner - 0.5, y_corner - 0.5])


def after_crop(pix: np.ndarray, wh: tuple[int, int], target: int) -> np.ndarray:
    """Where VGGT's crop preprocessing moves a pixel-centre coordinate, derived from scratch: the resize maps
    image-corner coordinates by scale (PIL resamples centre-aligned), the crop subtracts its start row."""
    w, h = wh
    new_w, new_h = target, round(h * target / w / 14) * 14
    top = max(new_h - target, 0) // 2
    return np.array([(pix[0] + 0.5) * new_w / w - 0.5, (pix[1] + 0.5) * new_h / h - 0.5 - top])


def cv_pixel(xw: np.ndarray, extr: np.ndarray, k: np.ndarray) -> np.ndarray:
    xc = k.astype(np.float64) @ (extr[:, :3].astype(np.float64) @ xw + extr[:, 3])
    return xc[:2] / xc[2]


def write_jgz(path: Path, obj: object) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(obj, f)


# ------------------------------------------------------------------------------------------ Co3D fixture

BLOB_POINT = np.array([0.05, -0.08, 0.1])  # world point drawn as a bright blob in every "bench/seqE" frame
# category -> sequence -> (quality, frame count, split, (W, H), intrinsics_format or None for "key absent")
CO3D_LAYOUT = {
    "apple": {
        "seqA": (0.9, 12, "test", (64, 48), "ndc_isotropic"),
        "seqB": (0.3, 12, "test", (64, 48), "ndc_isotropic"),  # low quality
        "seqC": (0.8, 6, "test", (64, 48), "ndc_isotropic"),  # too short
        "seqD": (0.9, 12, "train", (64, 48), "ndc_isotropic"),
        "seqG": (0.95, 12, "test", (64, 48), "ndc_isotropic"),  # one frame's pose is broken (BROKEN_POSE)
    },
    "bench": {"seqE": (0.7, 12, "test", (48, 64), "ndc_norm_image_bounds"), "seqF": (0.6, 12, "test", (48, 64), None)},
    "frisbee": {"seqH": (0.9, 12, "test", (64, 48), "ndc_isotropic")},  # a Co3Dv2 category VGGT does not report
}
# (category, sequence, frame index): a viewpoint T with T[0] + T[1] + T[2] > 1e5, which VGGT's sanity check rejects.
BROKEN_POSE = ("apple", "seqG", 11)


def multi_layout(
    categories: tuple[str, ...], n_test: int, n_train: int, wh: tuple[int, int] = (32, 24), frames: int = 12
) -> dict:
    """A layout with ``n_test`` test and ``n_train`` train sequences (``frames`` frames, good quality) per category."""
    return {
        cat: {
            **{f"t{i}": (0.9, frames, "test", wh, "ndc_isotropic") for i in range(n_test)},
            **{f"r{i}": (0.9, frames, "train", wh, "ndc_isotropic") for i in range(n_train)},
        }
        for cat in categories
    }


def co3d_viewpoint(seq_idx: int, frame: int, fmt: str | None) -> dict:
    r = rot("y", 25.0 * frame + 7 * seq_idx) @ rot("x", 10.0 + 3 * frame)
    vp = {
        "R": r.tolist(),
        "T": [0.1 - 0.02 * frame, -0.05, 2.5 + 0.1 * seq_idx],
        "focal_length": [1.8 + 0.01 * frame, 1.9],
        "principal_point": [0.05, -0.1 + 0.01 * seq_idx],
    }
    if fmt is not None:
        vp["intrinsics_format"] = fmt
    return vp


def blob_image(wh: tuple[int, int], center: np.ndarray, sigma: float = 1.6) -> Image.Image:
    w, h = wh
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    g = np.exp(-((u - center[0]) ** 2 + (v - center[1]) ** 2) / (2 * sigma**2))
    return Image.fromarray(np.repeat((255 * g).round().astype(np.uint8)[..., None], 3, -1))


def write_tiny_co3d(
    root: Path, layout: dict | None = None, broken_pose: bool = True, black: tuple[tuple[str, str], ...] = ()
) -> Path:
    """Write a tiny Co3Dv2-format directory of ``layout`` (default ``CO3D_LAYOUT``) under ``root`` (created) and
    return it. ``broken_pose``: plant ``BROKEN_POSE``'s huge translation; ``black``: (category, sequence) pairs whose
    images are all black instead of noise (an outlier for calibration-set selection)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for cat, seqs in (CO3D_LAYOUT if layout is None else layout).items():
        (root / cat / "set_lists").mkdir(parents=True)
        frames, sequences, lists = [], [], {"train": [], "val": [], "test": []}
        for si, (seq, (quality, n, split, (w, h), fmt)) in enumerate(seqs.items()):
            sequences.append({"sequence_name": seq, "category": cat, "viewpoint_quality_score": quality})
            (root / cat / seq / "images").mkdir(parents=True)
            for k in range(n):
                num = 3 * k + 1  # frame numbers need not be 0..n-1
                vp = co3d_viewpoint(si, k, fmt)
                if broken_pose and (cat, seq, k) == BROKEN_POSE:
                    vp["T"] = [1e5, 20.0, 3.0]
                if seq == "seqE":  # lossless blob image for the end-to-end geometry check
                    rel = f"{cat}/{seq}/images/frame{num:06d}.png"
                    blob_image((w, h), p3d_pixel(BLOB_POINT, vp, (h, w))).save(root / rel)
                else:
                    rel = f"{cat}/{seq}/images/frame{num:06d}.jpg"
                    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                    Image.fromarray(pixels * ((cat, seq) not in black)).save(root / rel, quality=90)
                frames.append(
                    {
                        "sequence_name": seq,
                        "frame_number": num,
                        "frame_timestamp": 0.1 * k,
                        "image": {"path": rel, "size": [h, w]},
                        "viewpoint": vp,
                    }
                )
                lists[split].append([seq, num, rel])
        write_jgz(root / cat / "frame_annotations.jgz", frames)
        write_jgz(root / cat / "sequence_annotations.jgz", sequences)
        (root / cat / "set_lists" / "set_lists_fewview_dev.json").write_text(json.dumps(lists))
    (root / "not_a_category").mkdir()  # ignored: no annotations
    return root
