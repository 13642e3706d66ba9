"""Tests for qvggt.data.images: sizes, padding, RGBA handling, values and errors of the VGGT-style loader."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qvggt.data.images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    check_target_size,
    list_image_files,
    load_image_folder,
    load_images,
    preprocess_pil,
)


def _save_rgb(path: Path, w: int, h: int, seed: int = 0) -> Path:
    # Structured texture (cheap to encode, unlike full noise) plus small noise so bicubic has work to do.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx * 7 + yy * 13 + seed * 31) % 256], -1)
    noise = np.random.default_rng(seed).integers(-20, 21, base.shape)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB").save(path, compress_level=1)
    return path


# (width, height, target) -> expected (H, W), worked out by hand from the published formulas:
# crop: W = t, H = min(t, round(h * t / w / 14) * 14); pad: always t x t.
CROP_CASES = [
    (640, 480, 518, (392, 518)),  # 480*518/640 = 388.5 -> /14 = 27.75 -> 28*14 = 392
    (480, 640, 518, (518, 518)),  # 690.67 -> 49.33 -> 49*14 = 686 > 518 -> centre-cropped to 518
    (1920, 600, 518, (168, 518)),  # 161.875 -> 11.56 -> 12*14 = 168
    (500, 500, 518, (518, 518)),
    (74, 37, 518, (252, 518)),  # 259/14 = 18.5 -> round-half-to-even -> 18*14 = 252 (not 266)
    (640, 480, 126, (98, 126)),  # 94.5 -> 6.75 -> 7*14 = 98
    (1280, 720, 224, (126, 224)),  # 126 -> exactly 9*14
]


@pytest.mark.parametrize(("w", "h", "t", "expected"), CROP_CASES)
def test_crop_output_size(tmp_path: Path, w: int, h: int, t: int, expected: tuple[int, int]) -> None:
    Image.new("RGB", (w, h), (10, 200, 30)).save(tmp_path / "a.png")  # only the size matters here
    out = load_images([tmp_path / "a.png"], mode="crop", target_size=t)
    assert out.shape == (1, 3, *expected)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("w", "h", "t", "content_hw"),
    [
        (640, 480, 518, (392, 518)),  # landscape: width -> 518, height 392, 63 px white bands top and bottom
        (480, 640, 518, (518, 392)),  # portrait: height -> 518, width 392
        (1000, 999, 126, (126, 126)),  # near-square: no band
        (300, 100, 126, (42, 126)),  # 100*126/300 = 42
    ],
)
def test_pad_size_and_white_band(tmp_path: Path, w: int, h: int, t: int, content_hw: tuple[int, int]) -> None:
    # Black image, so the only white (1.0) pixels are padding.
    Image.new("RGB", (w, h), (0, 0, 0)).save(tmp_path / "b.png")
    out = load_images([tmp_path / "b.png"], mode="pad", target_size=t)[0]
    assert out.shape == (3, t, t)
    ch, cw = content_hw
    top, left = (t - ch) // 2, (t - cw) // 2
    white = torch.ones_like(out, dtype=torch.bool)
    white[:, top : top + ch, left : left + cw] = False
    assert torch.all(out[white] == 1.0)
    assert torch.all(out[~white] == 0.0)


def test_values_match_hand_resized_pil(tmp_path: Path) -> None:
    path = _save_rgb(tmp_path / "c.png", 300, 200, seed=3)
    out = load_images([path], mode="crop", target_size=126)[0]
    # 200*126/300 = 84 = 6*14: plain bicubic resize to 126x84, no crop.
    ref = np.asarray(Image.open(path).convert("RGB").resize((126, 84), Image.Resampling.BICUBIC))
    expected = torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 255.0
    assert out.shape == expected.shape
    assert torch.equal(out, expected)
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_crop_takes_the_centre(tmp_path: Path) -> None:
    # Tall image: top third red, middle third green, bottom third blue. After the centre crop of a
    # 14x(3*14*k) image the top and bottom rows must come from the middle, not the red/blue ends.
    h = 14 * 9
    arr = np.zeros((h, 14, 3), np.uint8)
    arr[: h // 3, :, 0] = 255
    arr[h // 3 : 2 * h // 3, :, 1] = 255
    arr[2 * h // 3 :, :, 2] = 255
    Image.fromarray(arr).save(tmp_path / "tall.png")
    out = load_images([tmp_path / "tall.png"], mode="crop", target_size=28)[0]  # resize to 28x252, crop 28 rows
    assert out.shape == (3, 28, 28)
    assert torch.all(out[1] > 0.99) and torch.all(out[0] < 0.01) and torch.all(out[2] < 0.01)


def test_rgba_transparent_becomes_white(tmp_path: Path) -> None:
    arr = np.zeros((56, 56, 4), np.uint8)
    arr[..., 0] = 255  # red everywhere ...
    arr[:, 28:, 3] = 255  # ... but only the right half is opaque
    Image.fromarray(arr, "RGBA").save(tmp_path / "rgba.png")
    out = load_images([tmp_path / "rgba.png"], mode="crop", target_size=56)[0]
    assert out.shape == (3, 56, 56)
    assert torch.all(out[:, :, :20] == 1.0)  # transparent -> white (not black, not red)
    right = out[:, :, 36:]
    assert torch.all(right[0] == 1.0) and torch.all(right[1:] == 0.0)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    Image.fromarray(np.full((30, 40), 77, np.uint8), "L").save(tmp_path / "g.png")
    out = load_images([tmp_path / "g.png"], target_size=42)[0]
    assert out.shape[0] == 3
    assert torch.allclose(out, torch.full_like(out, 77 / 255.0))


def test_mixed_shapes_padded_white_with_warning(tmp_path: Path) -> None:
    a = _save_rgb(tmp_path / "a.png", 300, 100)  # crop at 126 -> 42 x 126
    b = _save_rgb(tmp_path / "b.png", 100, 100)  # -> 126 x 126
    with pytest.warns(UserWarning, match="different shapes"):
        out = load_images([a, b], target_size=126)
    assert out.shape == (2, 3, 126, 126)
    alone = load_images([a], target_size=126)[0]
    assert torch.equal(out[0, :, 42:84], alone)  # (126 - 42) // 2 = 42 rows of white on top
    assert torch.all(out[0, :, :42] == 1.0) and torch.all(out[0, :, 84:] == 1.0)


def test_same_shapes_no_warning(tmp_path: Path) -> None:
    paths = [_save_rgb(tmp_path / f"{i}.png", 64, 48, seed=i) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_images(paths, mode="crop", target_size=56)
    assert out.shape == (3, 3, 42, 56)


def test_preprocess_pil_matches_file_loader(tmp_path: Path) -> None:
    path = _save_rgb(tmp_path / "p.png", 90, 160)
    for mode in ("crop", "pad"):
        assert torch.equal(preprocess_pil(Image.open(path), mode, 70), load_images([path], mode, 70)[0])


def test_list_image_files_sorted_and_filtered(tmp_path: Path) -> None:
    for name in ["b.JPG", "a.png", "c.jpeg", "d.Bmp", "e.webp", "notes.txt", ".hidden.png", "z.gif"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_image_files(tmp_path)] == ["a.png", "b.JPG", "c.jpeg", "d.Bmp", "e.webp"]


def test_load_image_folder(tmp_path: Path) -> None:
    _save_rgb(tmp_path / "1.png", 56, 56, seed=1)
    _save_rgb(tmp_path / "0.jpg", 56, 56, seed=0)
    out = load_image_folder(tmp_path, target_size=56)
    assert out.shape == (2, 3, 56, 56)
    assert torch.equal(out, load_images([tmp_path / "0.jpg", tmp_path / "1.png"], target_size=56))


def test_error_empty_folder_names_extensions(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ImageLoadError, match="no images found") as info:
        load_image_folder(tmp_path)
    assert all(ext in str(info.value) for ext in IMAGE_EXTENSIONS)


def test_error_empty_list() -> None:
    with pytest.raises(ValueError, match="at least one image"):
        load_images([])


def test_error_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError, match="not found") as info:
        load_images([missing])
    assert str(missing) in str(info.value)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image_folder(tmp_path / "no_such_dir")


def test_error_corrupt_file_names_file(tmp_path: Path) -> None:
    good = _save_rgb(tmp_path / "good.png", 28, 28)
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x00garbage, definitely not a PNG" * 10)
    with pytest.raises(ImageLoadError, match="cannot read image") as info:
        load_images([good, bad], target_size=28)
    assert str(bad) in str(info.value)


def test_error_truncated_file(tmp_path: Path) -> None:
    path = _save_rgb(tmp_path / "t.png", 200, 200)
    path.write_bytes(path.read_bytes()[:300])  # valid header, truncated pixel data
    with pytest.raises(ImageLoadError, match="t.png"):
        load_images([path], target_size=28)


def test_error_bad_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preprocessing mode 'stretch'"):
        load_images([_save_rgb(tmp_path / "a.png", 28, 28)], mode="stretch")


@pytest.mark.parametrize(("size", "nearest"), [(500, "490 or 504"), (10, "14"), (0, "14"), (-3, "14")])
def test_error_bad_target_size(tmp_path: Path, size: int, nearest: str) -> None:
    with pytest.raises(ValueError, match=nearest):
        check_target_size(size)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        load_images([_save_rgb(tmp_path / "a.png", 28, 28)], target_size=size)


def test_error_single_path_not_list(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="wrap it in a list"):
        load_images(str(_save_rgb(tmp_path / "a.png", 28, 28)))  # type: ignore[arg-type]


def test_error_too_elongated(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="too elongated"):
        load_images([_save_rgb(tmp_path / "strip.png", 1000, 5)], target_size=126)
