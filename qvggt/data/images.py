"""Image loading and preprocessing for VGGT-style models.

Reproduces the published VGGT loader (``vggt.utils.load_fn.load_and_preprocess_images``) pixel for pixel,
with ``target_size`` as a parameter (the published one hard-codes 518) and clear errors instead of raw PIL
tracebacks. It needs only Pillow, NumPy and torch (no torchvision).

Preprocessing, per image:

1. Open with PIL. An ``RGBA`` image is alpha-composited onto opaque white, then everything is converted to
   ``RGB``. (As published, only mode ``RGBA`` is composited; ``LA``/``P`` images with transparency go
   through a plain ``convert("RGB")``.)
2. Resize with PIL bicubic to ``(new_w, new_h)``:

   - ``"crop"`` (default): ``new_w = target``, ``new_h = round(h * target / w / 14) * 14``; then centre-crop
     the height to ``target`` if ``new_h > target`` (crop start ``(new_h - target) // 2``).
   - ``"pad"``: the long side becomes ``target`` and the short side ``round(short * target / long / 14) * 14``
     (a square image counts as landscape); then pad with white (1.0) to ``target x target``, putting
     ``pad // 2`` on the top/left and the rest on the bottom/right.

   ``round`` is Python's round-half-to-even, as in the published code.
3. Convert to float32 in [0, 1] as ``uint8 / 255`` (``torchvision.transforms.ToTensor`` semantics).

If the images of one call end up with different shapes (possible only in ``"crop"`` mode, for differing
aspect ratios), each is centre-padded with white to the largest height and width, and a warning is issued.

Output: float32 tensor ``[N, 3, H, W]``, values in [0, 1], ``H`` and ``W`` multiples of 14.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DEFAULT_TARGET_SIZE",
    "IMAGE_EXTENSIONS",
    "PATCH_SIZE",
    "ImageLoadError",
    "check_target_size",
    "list_image_files",
    "load_image_folder",
    "load_images",
    "preprocess_geometry",
    "preprocess_pil",
]

logger = logging.getLogger(__name__)

#: Side lengths must be multiples of the ViT patch size.
PATCH_SIZE = 14
DEFAULT_TARGET_SIZE = 518
#: File suffixes (lower case) that :func:`list_image_files` picks up; matching is case-insensitive.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_MODES = ("crop", "pad")
_WHITE = 1.0


class ImageLoadError(ValueError):
    """An image (or folder of images) could not be loaded; the message names the file and the fix."""


class _ImageSizeError(ValueError):
    """The image is too elongated to be resized to the requested target size."""


def check_target_size(target_size: int) -> int:
    """Return ``target_size`` if it is a positive multiple of 14; else raise ``ValueError`` naming the nearest
    valid values (``TypeError`` if it is not an int at all)."""
    if isinstance(target_size, bool) or not isinstance(target_size, (int, np.integer)):
        raise TypeError(f"target_size must be an int multiple of {PATCH_SIZE}, got {target_size!r}")
    target_size = int(target_size)
    if target_size < PATCH_SIZE or target_size % PATCH_SIZE:
        lower = (target_size // PATCH_SIZE) * PATCH_SIZE
        upper = lower + PATCH_SIZE
        nearest = f"{lower} or {upper}" if lower >= PATCH_SIZE else f"{PATCH_SIZE}"
        raise ValueError(
            f"target_size must be a positive multiple of the patch size {PATCH_SIZE}, got {target_size}; "
            f"nearest valid value(s): {nearest}"
        )
    return target_size


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; use one of {_MODES}")
    return mode


def _round_to_patch(x: float) -> int:
    # Python round() (half-to-even) on purpose: it is what the published loader uses.
    return round(x / PATCH_SIZE) * PATCH_SIZE


def _resized_size(width: int, height: int, mode: str, target_size: int) -> tuple[int, int]:
    """Size ``(new_w, new_h)`` of the bicubic resize, before any crop or pad."""
    if mode == "pad" and height > width:
        return _round_to_patch(width * (target_size / height)), target_size
    # "crop", and "pad" for landscape/square images: the width becomes target_size.
    return target_size, _round_to_patch(height * (target_size / width))


def preprocess_geometry(
    width: int, height: int, mode: str = "crop", target_size: int = DEFAULT_TARGET_SIZE
) -> tuple[int, int, int, int]:
    """Where :func:`preprocess_pil` puts an image of size ``width x height``: ``(new_w, new_h, x0, y0)``.

    ``(new_w, new_h)`` is the bicubic resize size; output pixel ``(u, v)`` is resized pixel ``(u + x0, v + y0)``.
    ``"crop"``: ``x0 = 0``, ``y0`` = the centre-crop start (``>= 0``); ``"pad"``: ``x0, y0 <= 0`` (minus the
    left/top white padding). The resize is centre-aligned (PIL), so in continuous coordinates with the origin
    at the top-left image *corner* a point ``x`` maps to ``x * new_w / width - x0`` (likewise ``y``); with
    the origin at the top-left pixel *centre* (OpenCV) ``u -> (u + 0.5) * new_w / width - 0.5 - x0``.
    Use it to carry intrinsics through preprocessing.
    """
    _check_mode(mode)
    target_size = check_target_size(target_size)
    new_w, new_h = _resized_size(int(width), int(height), mode, target_size)
    if mode == "pad":
        return new_w, new_h, -((target_size - new_w) // 2), -((target_size - new_h) // 2)
    return new_w, new_h, 0, max(new_h - target_size, 0) // 2


def _pad_white(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-pad ``img [3, h, w]`` with white to ``[3, height, width]`` (extra pixel on bottom/right)."""
    h_pad = height - img.shape[1]
    w_pad = width - img.shape[2]
    if h_pad <= 0 and w_pad <= 0:
        return img
    top, left = h_pad // 2, w_pad // 2
    return torch.nn.functional.pad(img, (left, w_pad - left, top, h_pad - top), mode="constant", value=_WHITE)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGBA":
        # Composite onto opaque white so transparent pixels become white, not black.
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def preprocess_pil(img: Image.Image, mode: str = "crop", target_size: int = DEFAULT_TARGET_SIZE) -> torch.Tensor:
    """Preprocess one PIL image as the published VGGT loader does (see the module docstring).

    Args:
        img: any PIL image (RGBA is composited on white; other modes are converted to RGB).
        mode: ``"crop"`` (width -> target_size, centre-crop tall images) or ``"pad"`` (long side ->
            target_size, pad with white to a square).
        target_size: output width (``"crop"``) or side (``"pad"``); a multiple of 14.

    Returns:
        float32 tensor ``[3, H, W]`` in [0, 1]. ``"crop"``: ``W = target_size``, ``H <= target_size``.
        ``"pad"``: ``H = W = target_size``.
    """
    _check_mode(mode)
    target_size = check_target_size(target_size)
    rgb = _to_rgb(img)
    width, height = rgb.size
    new_w, new_h = _resized_size(width, height, mode, target_size)
    if new_w < PATCH_SIZE or new_h < PATCH_SIZE:
        raise _ImageSizeError(
            f"image of size {width}x{height} (WxH) is too elongated for target_size={target_size} in mode "
            f"{mode!r}: its short side would shrink below {PATCH_SIZE} px; crop it first or use a larger target_size"
        )
    rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # ToTensor semantics: HWC uint8 -> CHW float32 / 255.
    out = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)

    if mode == "crop" and new_h > target_size:
        start = (new_h - target_size) // 2
        out = out[:, start : start + target_size, :]
    elif mode == "pad":
        out = _pad_white(out, target_size, target_size)
    return out.contiguous()


def _load_one(path: Path, mode: str, target_size: int) -> torch.Tensor:
    if not path.exists():
        raise ImageLoadError(f"image file not found: {path} (check the path, or pass an existing file)")
    if path.is_dir():
        raise ImageLoadError(f"expected an image file but got a directory: {path} (use load_image_folder for folders)")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated/corrupt data fails here, with the file named
            return preprocess_pil(img, mode=mode, target_size=target_size)
    except _ImageSizeError as exc:  # add the file name to our own size error
        raise ImageLoadError(f"cannot preprocess image {path}: {exc}") from exc
    except Exception as exc:  # PIL raises UnidentifiedImageError/OSError/SyntaxError/... for bad files
        raise ImageLoadError(
            f"cannot read image {path}: {type(exc).__name__}: {exc}. The file is corrupt or not a supported "
            f"image; re-export it as PNG/JPEG or remove it from the input"
        ) from exc


def load_images(
    paths: Sequence[str | Path],
    mode: str = "crop",
    target_size: int = DEFAULT_TARGET_SIZE,
) -> torch.Tensor:
    """Load and preprocess images into one batch, matching the published VGGT loader.

    Args:
        paths: image file paths, in frame order (the first one is the reference view for VGGT).
        mode: ``"crop"`` (default) or ``"pad"``; see the module docstring.
        target_size: multiple of 14 (518 for the published model; e.g. 126 or 224 for small presets).

    Returns:
        float32 tensor ``[N, 3, H, W]`` in [0, 1], ``N = len(paths)``.

    Raises:
        ImageLoadError (a ValueError): empty list, missing file, unreadable/corrupt file.
        ValueError: unknown ``mode`` or invalid ``target_size``.
        TypeError: a single path given instead of a sequence of paths, or a non-int ``target_size``.
    """
    if isinstance(paths, (str, Path)):
        raise TypeError(
            f"load_images expects a sequence of paths, got a single path {paths!r}; "
            "wrap it in a list, or use load_image_folder for a directory"
        )
    _check_mode(mode)
    target_size = check_target_size(target_size)
    paths = [Path(p) for p in paths]
    if not paths:
        raise ImageLoadError("no images given: pass at least one image path")

    images = [_load_one(p, mode, target_size) for p in paths]
    shapes = {tuple(img.shape[1:]) for img in images}
    if len(shapes) > 1:
        max_h = max(h for h, _ in shapes)
        max_w = max(w for _, w in shapes)
        warnings.warn(
            f"images have different shapes after preprocessing {sorted(shapes)}; padding them with white to "
            f"{max_h}x{max_w} (HxW). Use mode='pad' or images of one aspect ratio to avoid this.",
            stacklevel=2,
        )
        images = [_pad_white(img, max_h, max_w) for img in images]
    batch = torch.stack(images)
    logger.debug("loaded %d images -> %s (mode=%s, target_size=%d)", len(paths), tuple(batch.shape), mode, target_size)
    return batch


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by file name.

    A file counts as an image if its suffix is in :data:`IMAGE_EXTENSIONS` (case-insensitive). Hidden files
    (name starting with ``.``, e.g. macOS ``._x.jpg`` resource forks) are skipped.

    Raises:
        ImageLoadError: ``folder`` does not exist or is not a directory.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ImageLoadError(f"image folder not found: {folder} (check the path)")
    if not folder.is_dir():
        raise ImageLoadError(f"expected a folder of images but got a file: {folder} (use load_images for files)")
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return sorted(files, key=lambda p: p.name)


def load_image_folder(
    folder: str | Path,
    mode: str = "crop",
    target_size: int = DEFAULT_TARGET_SIZE,
) -> torch.Tensor:
    """Load every image in ``folder`` (see :func:`list_image_files` for which and in what order) with
    :func:`load_images`. Returns float32 ``[N, 3, H, W]`` in [0, 1].

    Raises:
        ImageLoadError: the folder is missing, holds no images, or an image cannot be read.
    """
    files = list_image_files(folder)
    if not files:
        raise ImageLoadError(
            f"no images found in {folder}: accepted extensions are {', '.join(IMAGE_EXTENSIONS)} "
            "(case-insensitive); add images or point to the right folder"
        )
    return load_images(files, mode=mode, target_size=target_size)
