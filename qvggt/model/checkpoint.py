"""Checkpoint I/O: the released ``model.pt`` / ``.pth`` / ``.safetensors`` files and our own safetensors + config.

Models are built on the meta device and loaded with ``assign=True``, so a 1.2B-parameter model never exists
twice in memory. ``.pt`` files are read with ``weights_only=True``: a downloaded checkpoint can never run code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from qvggt.io import atomic_path
from qvggt.model.config import PRESETS, VGGTConfig, get_preset
from qvggt.model.vggt import VGGT

CONFIG_METADATA_KEY = "qvggt_config"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the architecture."""


def build_model(cfg: VGGTConfig, device: str | torch.device = "cpu") -> VGGT:
    """Instantiate VGGT; on ``device="meta"`` no memory is allocated (fill it with ``load_weights``)."""
    with torch.device(device):
        return VGGT(cfg)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read tensors from a ``.safetensors`` or ``.pt``/``.pth`` file (weights only, memory-mapped when possible).

    A ``{"model": state_dict}`` or ``{"state_dict": ...}`` wrapper, as training checkpoints have, is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (give the path to model.pt or a .safetensors file)")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix in TORCH_SUFFIXES:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            raise CheckpointError(
                f"unsupported checkpoint type {path.suffix!r} for {path}: use .pt, .pth or .safetensors"
            )
    except CheckpointError:
        raise
    except Exception as exc:  # torch/safetensors raise many types for corrupt or unsafe files
        raise CheckpointError(
            f"could not read checkpoint {path}: {exc.__class__.__name__}: {str(exc)[:300]} "
            "(is the file complete and a plain state_dict of tensors?)"
        ) from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    return dict(obj)


def _summarise(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def state_dict_mismatch(expected: Mapping[str, torch.Size], found: Mapping[str, Tensor]) -> tuple[list, list, list]:
    """(missing names, unexpected names, [(name, expected shape, found shape)])."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        (k, tuple(expected[k]), tuple(found[k].shape))
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k]) != tuple(found[k].shape)
    ]
    return missing, unexpected, misshaped


def guess_preset(state_dict: Mapping[str, Tensor]) -> str | None:
    """Name of the preset whose tensor names and shapes match ``state_dict`` exactly, if any."""
    for name, cfg in PRESETS.items():
        shapes = {k: v.shape for k, v in build_model(cfg, "meta").state_dict().items()}
        if not any(state_dict_mismatch(shapes, state_dict)):
            return name
    return None


def load_weights(
    model: VGGT, state_dict: Mapping[str, Tensor], source: str = "<state_dict>", strict: bool = True
) -> VGGT:
    """Load ``state_dict`` into ``model`` (which may live on meta), raising a CheckpointError that lists
    missing, unexpected and mis-shaped tensors and names ``source``."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected, misshaped = state_dict_mismatch(expected, state_dict)
    if misshaped or (strict and (missing or unexpected)):
        lines = [f"checkpoint {source} does not fit the {model.cfg.name!r} architecture:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_summarise(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_summarise(unexpected)}")
        if misshaped:
            shown = [f"{k} expected {e} found {f}" for k, e, f in misshaped]
            lines.append(f"  mis-shaped ({len(misshaped)}): {_summarise(shown, 6)}")
        guess = guess_preset(state_dict)
        lines.append(
            f"  it matches preset {guess!r}: pass --preset {guess}"
            if guess
            else "  pass the preset it was trained with"
        )
        raise CheckpointError("\n".join(lines))
    on_meta = any(p.is_meta for p in model.parameters())
    model.load_state_dict(dict(state_dict), strict=strict, assign=on_meta)
    return model


def read_config(path: str | Path) -> VGGTConfig | None:
    """The config stored in one of our safetensors files (metadata, else a sidecar ``.json``), or None."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # truncated or not a safetensors file
            raise CheckpointError(f"could not read checkpoint {path}: {exc} (is the file complete?)") from exc
        if CONFIG_METADATA_KEY in meta:
            return VGGTConfig.from_json(meta[CONFIG_METADATA_KEY])
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        return VGGTConfig.from_json(sidecar.read_text())
    return None


def load_vggt(
    checkpoint: str | Path | None = None,
    preset: str | VGGTConfig | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> VGGT:
    """Build a VGGT and load its weights.

    checkpoint: our safetensors (config read from it), or a released ``model.pt`` (preset defaults to vggt-1b).
    With no checkpoint, returns randomly initialised weights of ``preset``. ``strict=False`` tolerates missing and
    unexpected tensors (missing ones keep their random initialisation), never mis-shaped ones. ``dtype`` casts the
    floating weights (a checkpoint stored in fp16 runs in fp32 by default); None keeps the stored dtypes.
    """
    cfg: VGGTConfig | None = preset if isinstance(preset, VGGTConfig) else (get_preset(preset) if preset else None)
    if checkpoint is None:
        model = build_model(cfg or get_preset("vggt-1b"), device)
        return model.eval()
    stored = read_config(checkpoint)
    if cfg is None:
        cfg = stored or get_preset("vggt-1b")
    if cfg.correspondence_tokens and cfg.name == "vggt-1b":
        raise ValueError(
            "vggt-1b has no correspondence tokens (the released checkpoint has no matcher): "
            "load it with correspondence_tokens=False; the option is for small models trained here"
        )
    state_dict = read_state_dict(checkpoint)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    # Non-strict loads may leave tensors missing: those keep a real random initialisation, so build on CPU.
    model = load_weights(build_model(cfg, "meta" if strict else "cpu"), state_dict, str(checkpoint), strict)
    return model.to(device).eval()


def save_checkpoint(model: VGGT, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as safetensors with its config in the metadata and a sidecar JSON, atomically.

    dtype: cast floating tensors (e.g. torch.float16 for a compact committed checkpoint).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save to a .safetensors path, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        tensors[k] = (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
    cfg_json = model.cfg.to_json()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CONFIG_METADATA_KEY: cfg_json})
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(model.cfg.to_json(indent=2))
    return path
