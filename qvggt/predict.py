"""``qvggt predict``: run VGGT on a folder of images or a synthetic scene and write its outputs.

Writes, into the output folder:
  - ``predictions.npz``: the model's outputs under their own names, batch dim dropped (S frames, H x W):
    ``pose_enc`` [S, 9], ``depth`` [S, H, W, 1], ``depth_conf`` [S, H, W], ``world_points`` [S, H, W, 3],
    ``world_points_conf`` [S, H, W], plus ``extrinsic`` [S, 3, 4] (camera-from-world, OpenCV) and
    ``intrinsic`` [S, 3, 3], ``depth_points`` [S, H, W, 3] (the depth unprojected with the predicted cameras),
    and the input ``images`` [S, 3, H, W];
  - ``points.ply``: the confident part of the predicted points, coloured by the input: ``depth_points`` with
    ``depth_conf`` (``points="depth"``, the default of VGGT's demo and its more accurate branch) or the point
    head's ``world_points`` with ``world_points_conf`` (``points="pointmap"``);
  - ``prediction.png``: input frames, predicted depth, the rendered point cloud (next to ground truth for
    synthetic scenes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qvggt.data.images import load_image_folder
from qvggt.data.synthetic import make_scene
from qvggt.geometry.unproject import depth_to_world_points
from qvggt.io import atomic_open
from qvggt.model import load_vggt
from qvggt.model.inference import infer_scene
from qvggt.viz import confident_points, save_prediction_figure, write_ply

SYNTHETIC_PREFIX = "synthetic:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
POINT_SOURCES = {"depth": ("depth_points", "depth_conf"), "pointmap": ("world_points", "world_points_conf")}
OUTPUT_FILES = {"predictions": "predictions.npz", "ply": "points.ply", "png": "prediction.png"}


@dataclass(frozen=True)
class Inputs:
    """images [S, 3, H, W] in [0, 1]; for synthetic scenes also ground-truth points [S, H, W, 3] and mask."""

    images: torch.Tensor
    name: str
    gt_points: np.ndarray | None = None
    gt_mask: np.ndarray | None = None


def load_inputs(source: str, image_hw: tuple[int, int], num_frames: int = 8, mode: str = "crop") -> Inputs:
    """``synthetic:SEED`` renders that scene at ``image_hw``; anything else is a folder of images, resized to
    width ``image_hw[1]`` with the published crop/pad preprocessing."""
    if source.startswith(SYNTHETIC_PREFIX):
        seed_text = source[len(SYNTHETIC_PREFIX) :]
        if not seed_text.isdigit():
            raise ValueError(
                f"bad synthetic source {source!r}: use synthetic:SEED with an integer seed, e.g. synthetic:0"
            )
        scene = make_scene(int(seed_text), num_frames=num_frames, height=image_hw[0], width=image_hw[1]).normalized()
        return Inputs(torch.from_numpy(scene.images), scene.scene_id, scene.world_points, scene.valid_mask)
    folder = Path(source)
    images = load_image_folder(folder, mode=mode, target_size=image_hw[1])
    return Inputs(images, folder.name)


def predict(
    source: str,
    out_dir: str | Path,
    preset: str | None = None,
    checkpoint: str | Path | None = None,
    dtype: str = "float32",
    num_frames: int = 8,
    image_size: int | None = None,
    mode: str = "crop",
    conf_percentile: float = 50.0,
    seed: int = 0,
    device: str = "cpu",
    points: str = "depth",
) -> dict[str, Path]:
    """Run the whole predict job; returns the paths written. Raises ValueError subclasses on bad input.

    ``points`` picks the cloud written to points.ply and drawn in prediction.png: ``depth`` (depth map
    unprojected with the predicted cameras) or ``pointmap`` (the point head's output).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    if points not in POINT_SOURCES:
        raise ValueError(f"unknown points source {points!r}; use one of {sorted(POINT_SOURCES)}")
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    with tqdm(total=5, desc="predict", unit="step", leave=False) as steps:
        steps.set_postfix_str("loading model")
        # A checkpoint of ours carries its config; a released model.pt defaults to vggt-1b; no checkpoint: tiny.
        model = load_vggt(checkpoint, preset=preset or (None if checkpoint else "tiny"), device=device)
        steps.update()

        cfg = model.cfg
        hw = (image_size, image_size) if image_size else cfg.default_image_hw
        steps.set_postfix_str("loading images")
        inputs = load_inputs(source, hw, num_frames=num_frames, mode=mode)
        steps.update()

        steps.set_postfix_str(f"inference on {inputs.images.shape[0]} frames")
        arrays = infer_scene(model, inputs.images, DTYPES[dtype])
        arrays["images"] = inputs.images.numpy()
        arrays["depth_points"] = depth_to_world_points(arrays["depth"], arrays["extrinsic"], arrays["intrinsic"])
        steps.update()

        out_dir.mkdir(parents=True, exist_ok=True)
        # The three files are written into a staging folder and moved into place together at the end, so a failure
        # (e.g. in the figure) never leaves new predictions beside an older run's figure.
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".predict-"))
        try:
            staged = _write_outputs(
                staging, arrays, inputs, points, conf_percentile, seed, f"{inputs.name}: {cfg.name} ({dtype})", steps
            )
            paths = {name: out_dir / path.name for name, path in staged.items()}
            for name, path in staged.items():
                os.replace(path, paths[name])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return paths


def _write_outputs(
    folder: Path, arrays: dict, inputs: Inputs, points: str, conf_percentile: float, seed: int, title: str,
    steps: tqdm,
) -> dict[str, Path]:  # fmt: skip
    """predictions.npz, the confident point cloud (PLY) and the figure, in ``folder``; their paths."""
    paths = {name: folder / f for name, f in OUTPUT_FILES.items()}
    with atomic_open(paths["predictions"]) as f:
        np.savez_compressed(f, **arrays)
    points_key, conf_key = POINT_SOURCES[points]
    cloud, colors = confident_points(
        arrays[points_key], arrays[conf_key], arrays["images"], percentile=conf_percentile, seed=seed
    )
    write_ply(paths["ply"], cloud, colors)
    steps.update()

    steps.set_postfix_str("rendering figure")
    gt_points = gt_colors = None
    if inputs.gt_points is not None:
        gt_points, gt_colors = confident_points(
            inputs.gt_points, inputs.gt_mask.astype(np.float32), arrays["images"], percentile=0, mask=inputs.gt_mask
        )
    save_prediction_figure(
        paths["png"], arrays["images"], arrays["depth"], cloud, colors, gt_points=gt_points, gt_colors=gt_colors,
        title=title,
    )  # fmt: skip
    steps.update()
    return paths
